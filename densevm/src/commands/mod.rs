//! The `densevm` subcommands.

pub mod demo;
pub mod host_info;
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

impl From<vmm::driver::Error> for CommandError {
    fn from(e: vmm::driver::Error) -> Self {
        CommandError::Runtime(e.to_string())
    }
}

impl From<vmm::host::Error> for CommandError {
    fn from(e: vmm::host::Error) -> Self {
        match e {
            vmm::host::Error::Vm(vmm::vm::Error::Config(_))
            | vmm::host::Error::Vm(vmm::vm::Error::Workload(_))
            | vmm::host::Error::Vm(vmm::vm::Error::Ram(vmm::guest_ram::Error::Size(_))) => {
                CommandError::Input(e.to_string())
            }
            other => CommandError::Runtime(other.to_string()),
        }
    }
}
