//! The client against a canned server on a Unix socket: what it sends, what it makes of
//! the answers, and clear errors for bad input.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::thread;
use std::time::Duration;

use api_client::{Client, Error};

/// Serves one connection: for each canned answer, reads one request (head and
/// `Content-Length` body) and writes the answer. Returns the requests seen.
fn serve(listener: UnixListener, answers: Vec<&'static str>) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        let mut seen = Vec::new();
        for answer in answers {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                assert!(reader.read_line(&mut line).unwrap() > 0, "client closed early");
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            seen.push(head + &String::from_utf8(body).unwrap());
            writer.write_all(answer.as_bytes()).unwrap();
        }
        seen
    })
}

#[test]
fn requests_on_one_connection_and_their_answers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let server = serve(
        UnixListener::bind(&sock).unwrap(),
        vec![
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"a\": 1}",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET,HEAD\r\nTransfer-Encoding: chunked\r\n\r\n\
             2\r\nno\r\n0\r\n\r\n",
        ],
    );
    let mut c = Client::unix(&sock).unwrap();
    let r = c.request("GET", "/memory", None).unwrap();
    assert_eq!((r.status, r.header("Content-Type")), (200, Some("application/json")));
    assert_eq!(r.json_body::<serde_json::Value>().unwrap()["a"], 1);
    let r = c.request("PUT", "/vms/a", Some("")).unwrap();
    assert_eq!((r.status, r.text()), (204, ""));
    let r = c.request("DELETE", "/memory", None).unwrap();
    assert_eq!((r.status, r.header("allow"), r.text()), (405, Some("GET,HEAD"), "no"));
    drop(c);

    let seen = server.join().unwrap();
    assert!(seen[0].starts_with("GET /memory HTTP/1.1\r\n"), "{seen:?}");
    assert!(!seen[0].contains("content-length") && !seen[0].contains("content-type"), "{seen:?}");
    assert!(seen[1].starts_with("PUT /vms/a HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen[1].contains("content-type: application/json\r\n"), "{seen:?}");
    assert!(seen[1].contains("content-length: 0\r\n"), "{seen:?}");
    assert!(seen.iter().all(|r| r.contains("host: localhost\r\n")), "{seen:?}");
}

#[test]
fn bad_input_and_dead_servers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let e = Client::unix(&sock).err().unwrap();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.to_string().contains("api.sock"), "{e}");

    // Never answers: the exchange times out; bad methods and paths are refused first.
    let listener = UnixListener::bind(&sock).unwrap();
    let mut c = Client::unix(&sock).unwrap();
    let _held = listener.accept().unwrap();
    c.set_timeout(Duration::from_millis(200));
    for (m, p) in [("BAD METHOD", "/"), ("GET", "no path")] {
        let e = c.request(m, p, None).unwrap_err();
        assert!(matches!(e, Error::Request { .. }), "{e}");
    }
    let e = c.request("GET", "/", None).unwrap_err();
    assert!(matches!(e, Error::Timeout(_)), "{e}");

    // A connection closed without an answer.
    let mut c = Client::unix(&sock).unwrap();
    drop(listener.accept().unwrap());
    let e = c.request("GET", "/", None).unwrap_err();
    assert!(matches!(e, Error::Http(_)), "{e}");
}
