//! Training on several devices: which devices (`--devices`), and how the run uses them
//! (`--parallel`).
//!
//! A device is a local backend (`flex`, `ndarray`, `wgpu`, or `local` for the one `--backend`
//! picks) or a Burn remote server (`ws://host:port`, started with `burn-moe serve`). The first
//! device holds the model that is saved; with expert parallelism each MoE layer's experts are
//! spread over all the devices ([`moe_models::ExpertParallel`]), with data parallelism every
//! micro-batch is split over them, each device keeps a replica of the model with its own
//! optimizer, and the replicas' gradients are summed by an all-reduce before each applies the
//! same update ([`crate::training::replicas`]; each replica's loss is scaled by the share of
//! the batch it saw). Both at once is the default: replicated attention, sharded experts, as
//! DeepSpeed-MoE and FastMoE train.

use std::fmt;

use burn::tensor::remote::RemoteHost;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::runtime::backend::{self, BackendChoice, Precision, SelectedDevice};

/// How a run uses several devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallelism {
    /// Experts spread over the devices and the batch split over them.
    #[default]
    Both,
    /// Each MoE layer's experts spread over the devices; everything else on the first.
    Experts,
    /// A replica of the whole model on each device, each on its slice of the batch.
    Data,
}

impl Parallelism {
    /// The name `--parallel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Parallelism::Both => "both",
            Parallelism::Experts => "experts",
            Parallelism::Data => "data",
        }
    }

    /// Whether experts are placed over the devices.
    pub fn places_experts(self) -> bool {
        matches!(self, Parallelism::Both | Parallelism::Experts)
    }

    /// Whether the batch is split over the devices.
    pub fn splits_batch(self) -> bool {
        matches!(self, Parallelism::Both | Parallelism::Data)
    }
}

/// One entry of `--devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The device `--backend` picks.
    Local,
    /// A local backend.
    Backend(BackendChoice),
    /// A Burn remote server over WebSocket, `ws://host:port`.
    Remote(String),
}

impl DeviceSpec {
    /// Reads one entry: `local`, `flex`, `ndarray`, `wgpu` or `ws://host:port`.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        match text {
            "local" => return Ok(DeviceSpec::Local),
            "flex" => return Ok(DeviceSpec::Backend(BackendChoice::Flex)),
            "ndarray" => return Ok(DeviceSpec::Backend(BackendChoice::Ndarray)),
            "wgpu" => return Ok(DeviceSpec::Backend(BackendChoice::Wgpu)),
            _ => {}
        }
        let Some(address) = text.strip_prefix("ws://") else {
            return Err(TrainError::Config(format!(
                "`--devices`: `{text}` is not a device; give `local`, `flex`, `ndarray`, `wgpu` or a server as `ws://host:port` (started there with `burn-moe serve --port PORT`)"
            )));
        };
        let port = address
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(_))) if !host.is_empty() => Ok(DeviceSpec::Remote(text.to_string())),
            _ => Err(TrainError::Config(format!(
                "`--devices`: `{text}` needs a host and a port, as in `ws://192.168.1.20:7070`"
            ))),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Local => f.write_str("local"),
            DeviceSpec::Backend(backend) => write!(f, "{}", backend.name()),
            DeviceSpec::Remote(url) => f.write_str(url),
        }
    }
}

/// The devices of a run, opened, with the way it uses them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The devices (without autodiff), in `--devices` order, each with what it is.
    pub devices: Vec<(DeviceSpec, Device)>,
    /// How they are used.
    pub parallelism: Parallelism,
}

impl Layout {
    /// Opens `specs` (connecting to the servers, with `token` when they ask for one). An empty
    /// list is the one device `selected` is. Refuses a device listed twice and half precision
    /// on several devices.
    pub fn open(
        specs: &[String],
        parallelism: Parallelism,
        selected: &SelectedDevice,
        token: Option<&str>,
    ) -> Result<Self> {
        // Checked before any server is dialled.
        if specs.len() > 1 && selected.precision != Precision::F32 {
            return Err(TrainError::Config(format!(
                "`--precision {}` runs on one device; train on several in f32 (`--precision f32`)",
                selected.precision.name()
            )));
        }
        let mut devices = Vec::new();
        for text in specs {
            let spec = DeviceSpec::parse(text)?;
            let device = open_device(&spec, selected, token)?;
            if let Some((seen, _)) = devices.iter().find(|(_, seen)| *seen == device) {
                return Err(TrainError::Config(format!(
                    "`--devices` names one device twice (`{seen}` and `{spec}`, with `--backend {}`): list each device once",
                    selected.backend.name()
                )));
            }
            devices.push((spec, device));
        }
        if devices.is_empty() {
            devices.push((DeviceSpec::Local, selected.device.clone()));
        }
        Ok(Self {
            devices,
            parallelism,
        })
    }

    /// The device holding the model and the optimizer's state (without autodiff).
    pub fn main(&self) -> &Device {
        &self.devices[0].1
    }

    /// Whether the run uses more than one device.
    pub fn is_multi(&self) -> bool {
        self.devices.len() > 1
    }

    /// The devices the experts are spread over (empty: not placed).
    pub fn expert_devices(&self) -> Vec<Device> {
        match self.is_multi() && self.parallelism.places_experts() {
            true => self.autodiff_devices(),
            false => Vec::new(),
        }
    }

    /// The devices each micro-batch is split over, the main one first (one device: no split).
    pub fn data_devices(&self) -> Vec<Device> {
        match self.is_multi() && self.parallelism.splits_batch() {
            true => self.autodiff_devices(),
            false => vec![self.main().clone().autodiff()],
        }
    }

    fn autodiff_devices(&self) -> Vec<Device> {
        self.devices
            .iter()
            .map(|(_, device)| device.clone().autodiff())
            .collect()
    }

    /// The remote servers among the devices.
    pub fn remote_servers(&self) -> Vec<(&str, &Device)> {
        self.devices
            .iter()
            .filter_map(|(spec, device)| match spec {
                DeviceSpec::Remote(url) => Some((url.as_str(), device)),
                _ => None,
            })
            .collect()
    }

    /// The error for a run that failed at `step` with `message` while it had remote devices:
    /// names the servers that no longer answer (all of them if each still does, since one may
    /// have failed and come back).
    pub fn remote_failure(&self, step: usize, message: &str, out: &std::path::Path) -> TrainError {
        let servers = self.remote_servers();
        let silent: Vec<&str> = servers
            .iter()
            .filter(|(_, device)| {
                let probe = burn::tensor::Tensor::<1>::zeros([1], *device);
                crate::error::catch_panic_quietly(|| probe.try_into_data().is_err()).unwrap_or(true)
            })
            .map(|(url, _)| *url)
            .collect();
        let named = if silent.is_empty() {
            servers.iter().map(|(url, _)| *url).collect()
        } else {
            silent
        };
        TrainError::Remote {
            server: named.join(", "),
            reason: format!(
                "stopped answering at step {step} ({message}). The checkpoints in {} are intact: continue with `burn-moe train --out {} --resume` and `--devices` listing the devices that are left (`--devices local` for this machine alone)",
                out.display(),
                out.display()
            ),
        }
    }

    /// One line for the user: the devices and what runs where.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .devices
            .iter()
            .map(|(spec, _)| spec.to_string())
            .collect();
        let how = match (self.is_multi(), self.parallelism) {
            (false, _) => "one device",
            (true, Parallelism::Both) => {
                "experts spread over them, each micro-batch split over them"
            }
            (true, Parallelism::Experts) => "experts spread over them",
            (true, Parallelism::Data) => "each micro-batch split over them",
        };
        format!("devices: {} ({how})", names.join(", "))
    }
}

/// Opens one device: a local backend, or a connection to a remote server.
fn open_device(
    spec: &DeviceSpec,
    selected: &SelectedDevice,
    token: Option<&str>,
) -> Result<Device> {
    match spec {
        DeviceSpec::Local => Ok(selected.device.clone()),
        DeviceSpec::Backend(backend) if *backend == selected.backend => Ok(selected.device.clone()),
        DeviceSpec::Backend(backend) => Ok(backend::select(*backend, Precision::F32)?.device),
        DeviceSpec::Remote(url) => connect(url, token),
    }
}

/// A device of the Burn remote server at `url`, with `token` as its credential.
pub fn connect(url: &str, token: Option<&str>) -> Result<Device> {
    let mut host = RemoteHost::websocket(url);
    if let Some(token) = token {
        host = host.with_credential(token);
    }
    Device::remote_options(&host)
        .init()
        .map_err(|error| TrainError::Remote {
            server: url.to_string(),
            reason: format!(
                "could not connect: {error}. Is `burn-moe serve` running there, on that port, with the same `--token`?"
            ),
        })
}
