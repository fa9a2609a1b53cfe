//! `burn-moe serve`: this machine's device as a Burn remote server, for other machines'
//! `burn-moe train --devices ws://host:port,...`.
//!
//! The server is Burn's own (`burn::server::RemoteServer`, from burn-remote): it runs the
//! tensor operations clients send it on its device and sends tensors on to other servers
//! directly; the autodiff graph stays with the client. The transport is WebSocket, meant for
//! a trusted network; `--token` admits only clients that present it.

use std::io::Write;
use std::net::TcpListener;

use burn::server::{RemoteServer, TokenAuthorizer, WebSocketTransport};

use crate::cli::{token_or_env, ServeArgs};
use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, Precision};

/// Serves the device `args.backend` picks on `args.host:args.port` until the process is
/// stopped. The first line on standard output names the address clients dial.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let selected = backend::select(args.backend, Precision::F32)?;
    let listener = TcpListener::bind((args.host.as_str(), args.port)).map_err(|error| {
        TrainError::Config(format!(
            "`burn-moe serve` cannot listen on {}:{}: {error} (is the port taken? give another with `--port`)",
            args.host, args.port
        ))
    })?;
    let address = listener.local_addr().map_err(|error| {
        TrainError::Config(format!("the listening socket has no address: {error}"))
    })?;
    let mut server = RemoteServer::new([selected.device.clone()]);
    let token = token_or_env(&args.token);
    if let Some(token) = &token {
        let authorizer = TokenAuthorizer::new(token.as_str())
            .map_err(|_| TrainError::Config("`--token` is empty: give a token".into()))?;
        server = server.with_authorizer(authorizer);
    }
    println!("serving {selected} on ws://{address}");
    if token.is_none() && !address.ip().is_loopback() {
        eprintln!(
            "warning: no `--token`: anyone who reaches port {} can run tensor operations here; start with `--token SECRET` and train with the same `--token`",
            address.port()
        );
    }
    let _ = std::io::stdout().flush();
    server
        .serve(WebSocketTransport::from_listener(listener))
        .map_err(|error| TrainError::Remote {
            server: format!("ws://{address}"),
            reason: format!("serving stopped: {error}"),
        })
}
