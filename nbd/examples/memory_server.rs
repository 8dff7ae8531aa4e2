//! Serves an in-memory export for manual testing and quick throughput checks.
//!
//! cargo run -p blockvault-nbd --release --example memory_server -- [ADDR] [SIZE_MIB] [FILL_MIB]
//!
//! ADDR defaults to 127.0.0.1:10809 (a path containing '/' listens on a unix socket), SIZE_MIB
//! to 1024; the first FILL_MIB MiB are filled with data (default 0, all holes). Ctrl-C stops it.

use std::sync::Arc;

use blockvault_nbd::{proto, Export, Listener, MemoryDevice, Server, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| proto::DEFAULT_TCP_ADDR.to_owned());
    let size_mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let fill_mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);

    let dev = MemoryDevice::new(size_mib << 20);
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for i in 0..fill_mib.min(size_mib) {
        dev.write_at(i << 20, &block);
    }
    let server = Server::new(ServerConfig::default())?;
    server.add_export(Export::new("mem", Arc::new(dev)).with_description("in-memory disk"))?;
    let listener: Listener = if addr.contains('/') {
        tokio::net::UnixListener::bind(&addr)?.into()
    } else {
        tokio::net::TcpListener::bind(&addr).await?.into()
    };
    eprintln!("serving export \"mem\" ({size_mib} MiB) on {addr}");
    let stats = server.stats();
    server
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    eprintln!("{:?}", stats.snapshot());
    Ok(())
}
