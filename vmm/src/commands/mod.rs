//! The `densevm` subcommands.

pub mod bench;
pub mod bench_api;
pub mod bench_cow;
pub mod bench_merge;
pub mod demo;
pub mod driver;
pub mod host_info;
pub mod http_client;
pub mod run;
pub mod serve;

/// A subcommand's failure: bad input (exit 2) or a runtime failure (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad flags, files or scenarios.
    #[error("{0}")]
    Input(String),
    /// Anything else.
    #[error("{0}")]
    Runtime(String),
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Input(_) => 2,
            CommandError::Runtime(_) => 1,
        }
    }
}

impl From<crate::host::Error> for CommandError {
    fn from(e: crate::host::Error) -> Self {
        match e {
            crate::host::Error::Vm(crate::vm::Error::Config(_))
            | crate::host::Error::Vm(crate::vm::Error::Workload(_))
            | crate::host::Error::Vm(crate::vm::Error::Ram(crate::guest_ram::Error::Size(_))) => {
                CommandError::Input(e.to_string())
            }
            other => CommandError::Runtime(other.to_string()),
        }
    }
}
