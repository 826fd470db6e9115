//! Embedding switchyard in a smol program: a WebSocket-ready reverse proxy on 127.0.0.1:8080 in
//! front of 127.0.0.1:9000, with the access log printed, and Ctrl-C-free shutdown after a fixed
//! time to keep the example self-contained.
//!
//! ```sh
//! cargo run -p proxy-smol --example smol_embed -- 127.0.0.1:8080 127.0.0.1:9000
//! ```
//!
//! The same `serve` runs under async-std: replace the executor with
//! `async_std::task::block_on(serve(.., |t| { async_std::task::spawn(t); }))`.

use std::sync::Arc;
use std::time::Duration;

use proxy_core::{Config, Peer, UpstreamGroup};
use proxy_smol::{serve, ServeOptions, Shutdown};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let run_for = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).unwrap_or(60));

    let config = Config::new(UpstreamGroup::new(vec![Peer::parse(&upstream)?]));
    config.validate()?;
    let listener = std::net::TcpListener::bind(&listen)?;
    println!("proxying {listen} -> {upstream} for {run_for:?}");

    let mut options = ServeOptions::default();
    options.events = Arc::new(|event| {
        if let proxy_core::Event::Exchange(log) = event {
            println!("{} {:?} {}", log.request_line, log.status, log.upgraded);
        }
    });
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();

    let ex = Arc::new(smol::Executor::new());
    let spawner = {
        let ex = Arc::clone(&ex);
        move |task| ex.spawn(task).detach()
    };
    ex.spawn(async move {
        smol::Timer::after(run_for).await;
        stop.trigger();
    })
    .detach();
    smol::block_on(ex.run(serve(
        Arc::new(config),
        vec![listener],
        options,
        shutdown,
        spawner,
    )))?;
    Ok(())
}
