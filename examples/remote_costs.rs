//! What a Burn remote device costs: a transfer to and from a `burn-moe serve`-style server over
//! loopback WebSocket, a transfer between two servers, and one operation there, each timed
//! against the same work on local flex in the same run. The figures feed the multi-device
//! model in BENCHMARKS.md (the all-to-all of expert parallelism is such transfers).
//!
//! ```sh
//! cargo run --release --example remote_costs
//! ```

use std::net::TcpListener;
use std::time::Instant;

use burn::server::{RemoteServer, WebSocketTransport};
use burn::tensor::remote::RemoteHost;
use burn::tensor::{Device, Distribution, Tensor};

/// A flex device served on a thread of this process, dialled over 127.0.0.1.
fn serve_flex() -> Device {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let url = format!("ws://{}", listener.local_addr().expect("an address"));
    std::thread::spawn(move || {
        let _ =
            RemoteServer::new([Device::flex()]).serve(WebSocketTransport::from_listener(listener));
    });
    Device::remote_options(&RemoteHost::websocket(&url))
        .init()
        .expect("the server answers")
}

/// Median seconds of `runs` runs of `work`, after one warm-up run.
fn median_seconds(runs: usize, mut work: impl FnMut()) -> f64 {
    work();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() {
    let local = Device::flex();
    let (a, b) = (serve_flex(), serve_flex());
    println!("| rows x 512 f32 | bytes | local -> server -> local | server A -> server B -> local | MB/s (one way, local <-> server) |");
    println!("|---|---|---|---|---|");
    for rows in [8usize, 128, 2048, 16384] {
        let x = Tensor::<2>::random([rows, 512], Distribution::Default, &local);
        let bytes = rows * 512 * 4;
        let round_trip = median_seconds(9, || {
            let _ = x.clone().to_device(&a).to_device(&local).into_data();
        });
        let on_a = x.clone().to_device(&a);
        let between = median_seconds(9, || {
            let _ = on_a.clone().to_device(&b).to_device(&local).into_data();
        });
        println!(
            "| {rows} | {bytes} | {:.2} ms | {:.2} ms | {:.0} |",
            1e3 * round_trip,
            1e3 * between,
            2.0 * bytes as f64 / round_trip / 1e6
        );
    }
    let small = Tensor::<2>::random([8, 512], Distribution::Default, &local);
    let on_a = small.clone().to_device(&a);
    let chain = |x: Tensor<2>| {
        let mut y = x;
        for _ in 0..100 {
            y = y.add_scalar(1.0);
        }
        let _ = y.into_data();
    };
    let local_ops = median_seconds(9, || chain(small.clone())) / 100.0;
    let remote_ops = median_seconds(9, || chain(on_a.clone())) / 100.0;
    let read = median_seconds(9, || {
        let _ = on_a.clone().add_scalar(1.0).into_data();
    });
    println!();
    println!("| [8, 512] op | local flex | remote (loopback) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| one op in a chain of 100 | {:.1} us | {:.1} us | {:.1} |",
        1e6 * local_ops,
        1e6 * remote_ops,
        remote_ops / local_ops
    );
    println!(
        "| one op and its read back | - | {:.2} ms | - |",
        1e3 * read
    );
}
