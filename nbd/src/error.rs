//! Errors: [`DeviceError`] for block devices, [`Error`] for the server itself.

use std::fmt;
use std::io;

use crate::codec::CodecError;
use crate::proto;

/// What went wrong in a block device, in the coarse classes NBD can report to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceErrorKind {
    /// Reading or writing the backing store failed (reported as `NBD_EIO`).
    Io,
    /// The backing store is full (reported as `NBD_ENOSPC`).
    NoSpace,
    /// The operation is not allowed, e.g. a write to read-only data (`NBD_EPERM`).
    Perm,
    /// The request itself is wrong, e.g. out of range (`NBD_EINVAL`).
    Invalid,
    /// The device cannot do this operation (`NBD_ENOTSUP`).
    NotSupported,
}

impl DeviceErrorKind {
    /// The NBD error value sent to the client.
    pub fn nbd_errno(self) -> u32 {
        match self {
            DeviceErrorKind::Io => proto::EIO,
            DeviceErrorKind::NoSpace => proto::ENOSPC,
            DeviceErrorKind::Perm => proto::EPERM,
            DeviceErrorKind::Invalid => proto::EINVAL,
            DeviceErrorKind::NotSupported => proto::ENOTSUP,
        }
    }
}

impl fmt::Display for DeviceErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceErrorKind::Io => "i/o error",
            DeviceErrorKind::NoSpace => "no space left",
            DeviceErrorKind::Perm => "operation not permitted",
            DeviceErrorKind::Invalid => "invalid request",
            DeviceErrorKind::NotSupported => "not supported",
        })
    }
}

/// An error returned by a [`BlockDevice`](crate::BlockDevice). The message is shown to the NBD
/// client (shortened to a few hundred bytes), so it should name what failed without secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DeviceError {
    kind: DeviceErrorKind,
    message: String,
}

impl DeviceError {
    pub fn new(kind: DeviceErrorKind, message: impl Into<String>) -> Self {
        DeviceError {
            kind,
            message: message.into(),
        }
    }

    pub fn io(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Io, message)
    }

    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::NoSpace, message)
    }

    pub fn perm(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Perm, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Invalid, message)
    }

    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::NotSupported, message)
    }

    pub fn kind(&self) -> DeviceErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the same request might succeed later (an i/o error may be a passing fault; the
    /// other kinds are properties of the request or the device).
    pub fn is_transient(&self) -> bool {
        self.kind == DeviceErrorKind::Io
    }
}

impl From<io::Error> for DeviceError {
    fn from(err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                DeviceErrorKind::Perm
            }
            io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::FileTooLarge => DeviceErrorKind::NoSpace,
            io::ErrorKind::InvalidInput => DeviceErrorKind::Invalid,
            io::ErrorKind::Unsupported => DeviceErrorKind::NotSupported,
            _ => DeviceErrorKind::Io,
        };
        DeviceError::new(kind, err.to_string())
    }
}

/// Errors of the server: configuration, listeners, connections and final device flushes.
///
/// Protocol violations by a client end that client's connection and are logged; they are only
/// returned from [`Server::serve_stream`](crate::Server::serve_stream), which runs one connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid server configuration: {0}")]
    InvalidConfig(String),
    #[error("invalid export {name:?}: {reason}")]
    InvalidExport { name: String, reason: String },
    #[error("the connection limit of {0} is reached")]
    ConnectionLimit(usize),
    #[error("an export named {0:?} already exists")]
    DuplicateExport(String),
    #[error("i/o error while {context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("protocol error from client: {0}")]
    Protocol(#[from] CodecError),
    #[error("client violated the handshake: {0}")]
    Handshake(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("flushing export {export:?} failed: {source}")]
    Flush {
        export: String,
        #[source]
        source: DeviceError,
    },
}

impl Error {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        Error::Io { context, source }
    }

    /// Whether retrying the same call may succeed: i/o and device flush failures may be passing
    /// faults; configuration and protocol errors will fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Io { .. } | Error::HandshakeTimeout(_) | Error::ConnectionLimit(_) => true,
            Error::Flush { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_nbd_classes() {
        let e: DeviceError = io::Error::from(io::ErrorKind::PermissionDenied).into();
        assert_eq!(e.kind().nbd_errno(), proto::EPERM);
        let e: DeviceError = io::Error::from(io::ErrorKind::StorageFull).into();
        assert_eq!(e.kind().nbd_errno(), proto::ENOSPC);
        let e: DeviceError = io::Error::from(io::ErrorKind::UnexpectedEof).into();
        assert_eq!(e.kind().nbd_errno(), proto::EIO);
        assert!(e.is_transient());
        assert_eq!(
            DeviceError::not_supported("x").kind().nbd_errno(),
            proto::ENOTSUP
        );
        assert_eq!(DeviceError::invalid("x").kind().nbd_errno(), proto::EINVAL);
    }
}
