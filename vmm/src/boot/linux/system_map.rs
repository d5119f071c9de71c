//! A kernel's `System.map` (the `nm` listing `make` writes next to vmlinux): names
//! the kernel function an address is in, for the reports of exits densevm cannot
//! handle (`densevm run --system-map FILE`).
//!
//! Each line is `<hex address> <type letter> <name>`; only code symbols (types `t`,
//! `T`, `w`, `W`) are kept, so that per-CPU offsets and absolute values, which
//! overlap kernel addresses or sit near zero, never name a RIP.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::boot::boot_file;

/// Largest System.map read (a distribution kernel's is ~4 MiB).
pub const MAX_SYSTEM_MAP_BYTES: u64 = 64 << 20;

/// Errors reading a System.map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("cannot read System.map {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The path is refused ([`boot_file`]: not a regular file, in `/proc`, `/dev`
    /// or `/sys`, or outside the allowed directories).
    #[error(transparent)]
    Refused(boot_file::Error),
    /// The file is larger than [`MAX_SYSTEM_MAP_BYTES`].
    #[error("System.map {path} has {size} bytes, more than the {max} a System.map can have")]
    TooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A line is not `<hex address> <type> <name>`.
    #[error("System.map {path} line {line}: {text:?} is not \"<hex address> <type> <name>\"")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line (cut to 80 characters).
        text: String,
    },
    /// The file lists no code symbol.
    #[error(
        "System.map {0} lists no code symbol (a distribution's linux-image package may ship a stub: \
         Debian's real one is in linux-image-<version>-dbg; resources/linux/build-guest.sh extracts \
         it with DENSEVM_SYSTEM_MAP=1)"
    )]
    NoCodeSymbols(PathBuf),
}

/// The code symbols of a kernel, sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemMap {
    symbols: Vec<(u64, String)>,
}

/// The symbol an address falls in: `name+0xoffset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolRef<'a> {
    /// The symbol's name.
    pub name: &'a str,
    /// The address's offset from the symbol's start.
    pub offset: u64,
}

impl fmt::Display for SymbolRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)
    }
}

fn is_code(kind: &str) -> bool {
    matches!(kind, "t" | "T" | "w" | "W")
}

impl SystemMap {
    /// Parses the text of a System.map; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let syntax =
                || Error::Syntax { path: path.to_path_buf(), line: i + 1, text: line.chars().take(80).collect() };
            let (Some(addr), Some(kind), Some(name)) = (words.next(), words.next(), words.next()) else {
                return Err(syntax());
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| syntax())?;
            if kind.len() != 1 {
                return Err(syntax());
            }
            if is_code(kind) {
                symbols.push((addr, name.to_string()));
            }
        }
        if symbols.is_empty() {
            return Err(Error::NoCodeSymbols(path.to_path_buf()));
        }
        symbols.sort();
        Ok(SystemMap { symbols })
    }

    /// Reads and parses the System.map at `path`.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = match boot_file::open("System.map", path, u64::MAX) {
            Ok(f) => f,
            Err(boot_file::Error::Resolve { source, .. } | boot_file::Error::Io { source, .. }) => {
                return Err(io(source))
            }
            Err(e) => return Err(Error::Refused(e)),
        };
        if file.size > MAX_SYSTEM_MAP_BYTES {
            return Err(Error::TooBig { path: path.to_path_buf(), size: file.size, max: MAX_SYSTEM_MAP_BYTES });
        }
        let mut text = String::new();
        (&file.file).take(MAX_SYSTEM_MAP_BYTES).read_to_string(&mut text).map_err(io)?;
        Self::parse(&text, path)
    }

    /// Number of code symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when the map has no symbol (never, for a loaded map).
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The code symbol `addr` is in: the one with the highest address not above it.
    /// None below the first symbol and past the last one (`_etext`, `_einittext` and
    /// the like end the kernel's code).
    pub fn lookup(&self, addr: u64) -> Option<SymbolRef<'_>> {
        let idx = self.symbols.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        if idx + 1 == self.symbols.len() {
            return None;
        }
        let (start, name) = &self.symbols[idx];
        Some(SymbolRef { name, offset: addr - start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
00000000000001ea A kexec_control_code_size
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000070 T secondary_startup_64
ffffffff81001000 t native_write_cr4
ffffffff81001040 W weak_fn
ffffffff81e00000 T _etext
ffffffff82000000 D init_task
";

    fn map() -> SystemMap {
        SystemMap::parse(MAP, Path::new("System.map")).unwrap()
    }

    #[test]
    fn finds_nearest_code_symbol() {
        let m = map();
        assert_eq!(m.len(), 6);
        assert_eq!(m.lookup(0xffff_ffff_8100_1017).unwrap().to_string(), "native_write_cr4+0x17");
        assert_eq!(m.lookup(0xffff_ffff_8100_0070).unwrap().to_string(), "secondary_startup_64+0x0");
        assert_eq!(m.lookup(0xffff_ffff_8100_1100).unwrap().to_string(), "weak_fn+0xc0");
        // Two names at one address: either names it.
        let at_start = m.lookup(0xffff_ffff_8100_0005).unwrap();
        assert!(["_stext", "startup_64"].contains(&at_start.name), "{at_start}");
        assert_eq!(at_start.offset, 5);
    }

    #[test]
    fn data_and_out_of_range_addresses_have_no_symbol() {
        let m = map();
        assert_eq!(m.lookup(0x1ea), None, "absolute and per-CPU symbols never name an address");
        assert_eq!(m.lookup(0x100_0000), None, "below the first code symbol");
        assert_eq!(m.lookup(0xffff_ffff_8200_0010), None, "past _etext");
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let p = Path::new("x.map");
        let stub = "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n";
        let err = SystemMap::parse(stub, p).unwrap_err();
        assert!(matches!(err, Error::NoCodeSymbols(_)), "{err}");
        assert!(err.to_string().contains("DENSEVM_SYSTEM_MAP=1"), "{err}");
        let err = SystemMap::parse("ffffffff81000000 T ok\nzz T bad\n", p).unwrap_err();
        assert!(matches!(err, Error::Syntax { line: 2, .. }), "{err}");
        let err = SystemMap::parse("ffffffff81000000 T\n", p).unwrap_err();
        assert!(matches!(err, Error::Syntax { line: 1, .. }), "{err}");
        let err = SystemMap::parse("ffffffff81000000 TT x\n", p).unwrap_err();
        assert!(matches!(err, Error::Syntax { line: 1, .. }), "{err}");
        let err = SystemMap::load(Path::new("/nonexistent/System.map")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
