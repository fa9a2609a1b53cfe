//! Every kernel on a device of Burn's remote backend (the devices `burn-moe serve` hosts), served
//! in this process over WebSocket on 127.0.0.1, against the same kernel on local flex: the
//! remote backend runs each trait's composed default, so this checks those defaults run there
//! (Burn 0.22.1's remote server cannot run every op: `float_flip` fails) and agree.

use std::net::TcpListener;

use burn::server::{RemoteServer, WebSocketTransport};
use burn::tensor::remote::RemoteHost;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};

/// A remote device served by a server on a thread of this process.
fn remote_device() -> Device {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let _ =
            RemoteServer::new([Device::flex()]).serve(WebSocketTransport::from_listener(listener));
    });
    Device::remote_options(&RemoteHost::websocket(&url))
        .init()
        .unwrap()
}

fn values(data: TensorData) -> Vec<f64> {
    data.iter::<f64>().collect()
}

#[test]
fn kernels_on_a_remote_device_match_flex() {
    let remote = remote_device();
    let local = Device::flex();
    local.seed(3);
    let x = Tensor::<2>::random([6, 8], Distribution::Normal(0.0, 1.0), &local);
    let x4 = Tensor::<4>::random([1, 2, 6, 6], Distribution::Normal(0.0, 1.0), &local);
    let w = Tensor::<3>::random([3, 8, 5], Distribution::Normal(0.0, 1.0), &local);
    let gamma = Tensor::<1>::random([8], Distribution::Default, &local);
    let angles = Tensor::<2>::random([6, 4], Distribution::Default, &local);
    let ids = |values: Vec<i64>, shape: Vec<usize>, device: &Device| {
        Tensor::<1, Int>::from_data(
            TensorData::new(values, [shape.iter().product::<usize>()]),
            device,
        )
    };
    type Case = (&'static str, fn(&Inputs) -> TensorData);
    struct Inputs {
        x: Tensor<2>,
        x4: Tensor<4>,
        w: Tensor<3>,
        gamma: Tensor<1>,
        angles: Tensor<2>,
        targets: Tensor<1, Int>,
        offsets: Tensor<1, Int>,
    }
    let cases: [Case; 12] = [
        ("softmax", |i| {
            moe_kernels::softmax(i.x.clone(), 1).into_data()
        }),
        ("log_softmax", |i| {
            moe_kernels::log_softmax(i.x.clone(), 1).into_data()
        }),
        ("causal_softmax", |i| {
            moe_kernels::causal_softmax(i.x4.clone(), 0).into_data()
        }),
        ("top_k", |i| {
            moe_kernels::top_k_indices(i.x.clone(), 3).into_data()
        }),
        ("cross_entropy", |i| {
            moe_kernels::cross_entropy(i.x.clone(), i.targets.clone()).into_data()
        }),
        ("rms_norm", |i| {
            moe_kernels::rms_norm(i.x.clone(), i.gamma.clone(), 1e-5).into_data()
        }),
        ("gelu", |i| moe_kernels::gelu(i.x.clone()).into_data()),
        ("silu", |i| moe_kernels::silu(i.x.clone()).into_data()),
        ("rotary", |i| {
            moe_kernels::rotary(i.x.clone(), i.angles.clone().cos(), i.angles.clone().sin())
                .into_data()
        }),
        ("exclusive_cumsum", |i| {
            moe_kernels::exclusive_cumsum(i.targets.clone().reshape([2, 3])).into_data()
        }),
        ("gather_rows", |i| {
            moe_kernels::gather_rows(i.x.clone(), i.targets.clone()).into_data()
        }),
        ("grouped_matmul", |i| {
            moe_kernels::grouped_matmul(i.x.clone(), i.w.clone(), i.offsets.clone()).into_data()
        }),
    ];
    let inputs = |device: &Device| Inputs {
        x: x.clone().to_device(device),
        x4: x4.clone().to_device(device),
        w: w.clone().to_device(device),
        gamma: gamma.clone().to_device(device),
        angles: angles.clone().to_device(device),
        targets: ids(vec![0, 5, 2, 3, 4, 1], vec![6], device),
        offsets: ids(vec![0, 2, 2, 6], vec![4], device),
    };
    let (here, there) = (inputs(&local), inputs(&remote));
    for (name, case) in cases {
        let (a, b) = (values(case(&here)), values(case(&there)));
        assert_eq!(a.len(), b.len(), "{name}");
        let gap = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap < 1e-5, "{name}: remote differs from flex by {gap}");
    }
}
