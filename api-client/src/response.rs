//! One HTTP response as the client hands it out.

use serde::de::DeserializeOwned;

/// A complete HTTP response: status, headers and the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields in the order received; names lower-cased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body, decoded (no chunk framing) and read as UTF-8 (invalid sequences
    /// replaced): the API answers JSON or Prometheus text.
    pub body: String,
}

impl Response {
    /// The value of the first header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> &str {
        &self.body
    }

    /// The body deserialized from JSON.
    pub fn json_body<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.body)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_ignores_case_and_json_errors_are_errors() {
        let r = Response {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: "{\"a\": 1}".into(),
        };
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.header("allow"), None);
        assert_eq!(r.json_body::<serde_json::Value>().unwrap()["a"], 1);
        assert!(r.is_success());
        let bad = Response { body: "{".into(), ..r };
        assert!(bad.json_body::<serde_json::Value>().is_err());
    }
}
