//! The `densevm` subcommands.

pub mod daemon_limits;
pub mod demo;
pub mod host_info;
pub mod run;
pub mod serve;

use vmm::error_kind::ErrorKind;

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
    /// Bad input (exit 2) or a runtime failure (exit 1), by the error's [`ErrorKind`].
    fn from(e: vmm::host::Error) -> Self {
        match e.kind() {
            ErrorKind::InvalidInput => CommandError::Input(e.to_string()),
            ErrorKind::UnbootableKernel | ErrorKind::NotFound | ErrorKind::Conflict | ErrorKind::Internal => {
                CommandError::Runtime(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::{host, vm};

    #[test]
    fn exit_codes_by_kind() {
        let code = |e: host::Error| CommandError::from(e).exit_code();
        assert_eq!(code(host::Error::Vm(vm::Error::Config("x".into()))), 2);
        assert_eq!(code(host::Error::Vm(vm::Error::Ram(vmm::guest_ram::Error::Size(0)))), 2);
        assert_eq!(code(host::Error::NoSuchVm("a".into())), 1);
        assert_eq!(code(host::Error::Exists("a".into())), 1);
        assert_eq!(code(host::Error::Io("x".into())), 1);
        let kernel = vmm::boot::linux::Error::UnknownKernelFormat("/k".into());
        assert_eq!(code(host::Error::Vm(vm::Error::Linux(kernel))), 1);
    }
}
