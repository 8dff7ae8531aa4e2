//! NBD (Network Block Device) server for blockvault.
//!
//! Serves [`BlockDevice`]s over the fixed-newstyle NBD protocol with structured replies and the
//! `base:allocation` metadata context, so a restore point can be mounted by qemu, libnbd tools or
//! the Linux kernel client. The crate knows nothing of backups: the engine implements
//! [`BlockDevice`], the CLI creates a [`Server`] and calls [`Server::serve`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use blockvault_nbd::{Export, MemoryDevice, Server, ServerConfig};
//!
//! # async fn run() -> Result<(), blockvault_nbd::Error> {
//! let server = Server::new(ServerConfig::default())?;
//! server.add_export(Export::new("disk0", Arc::new(MemoryDevice::new(1 << 30))))?;
//! let listener = tokio::net::TcpListener::bind(blockvault_nbd::proto::DEFAULT_TCP_ADDR)
//!     .await
//!     .map_err(|e| blockvault_nbd::Error::Io { context: "binding", source: e })?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```
//!
//! See `docs/nbd-server.md` for what is supported, limits and error mapping.

mod access;
pub mod codec;
mod conn;
mod device;
mod error;
pub mod fuzzing;
mod handshake;
mod memory;
pub mod proto;
mod server;
mod stats;
mod tls;
mod transmission;
mod unaligned;

pub use async_trait::async_trait;

pub use crate::access::Cidr;
pub use crate::device::{BlockDevice, BlockSizes, Export, Extent, ReadSegment};
pub use crate::error::{DeviceError, DeviceErrorKind, Error};
pub use crate::memory::MemoryDevice;
pub use crate::server::{Listener, Security, Server, ServerConfig};
pub use crate::stats::{ServerStats, SessionSnapshot, StatsSnapshot};
pub use crate::tls::{TlsConfig, TlsKind, CA_CERT, SERVER_CERT, SERVER_KEY};
