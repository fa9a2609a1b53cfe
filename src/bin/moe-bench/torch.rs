//! W4: `bench/torch_moe.py` (PyTorch eager, same shapes, threads and dtype) as a server that
//! runs what the benchmark asks for, one run at a time.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde::Deserialize;

pub use burn_moe::bench::{TorchCase, TorchLayerRow, TorchResults, TorchStepRow};

/// The Python of `bench/.venv` if it exists.
pub fn default_python(root: &Path) -> Option<PathBuf> {
    let python = root.join("bench/.venv/bin/python");
    python.exists().then_some(python)
}

/// The first line the script prints in `--serve` mode.
#[derive(Debug, Deserialize)]
struct Header {
    torch: String,
    threads: usize,
    w1: Vec<TorchCase>,
}

/// `bench/torch_moe.py --serve` running beside the benchmark: it builds PyTorch's W1
/// configurations once, then runs what it is asked to, one run at a time, so that PyTorch's
/// runs alternate with ours and a slow spell of the machine falls on both.
pub struct TorchServer {
    child: Child,
    requests: ChildStdin,
    answers: BufReader<ChildStdout>,
    /// torch version.
    pub torch: String,
    /// Threads torch uses.
    pub threads: usize,
    /// W1's configurations, numbered as [`TorchServer::run_w1`] takes them.
    pub cases: Vec<TorchCase>,
}

impl TorchServer {
    /// Starts the script with `threads` threads and W1's layers for `experts`; `Err` says why
    /// there are no PyTorch figures.
    pub fn start(
        python: &Path,
        script: &Path,
        threads: usize,
        experts: &[usize],
    ) -> Result<Self, String> {
        let mut child = Command::new(python)
            .arg(script)
            .args(["--serve", "--threads", &threads.to_string(), "--experts"])
            .args(experts.iter().map(|e| e.to_string()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let requests = child.stdin.take().ok_or("no stdin for the script")?;
        let answers = BufReader::new(child.stdout.take().ok_or("no stdout for the script")?);
        let mut server = TorchServer {
            child,
            requests,
            answers,
            torch: String::new(),
            threads,
            cases: Vec::new(),
        };
        let header: Header = serde_json::from_str(&server.answer()?)
            .map_err(|e| format!("unreadable first line of {}: {e}", script.display()))?;
        server.torch = header.torch;
        server.threads = header.threads;
        server.cases = header.w1;
        Ok(server)
    }

    /// Runs W1 configuration `case` once; its seconds as the script timed them.
    pub fn run_w1(&mut self, case: usize) -> Result<f64, String> {
        self.ask(&format!("w1 {case}"))?
            .trim()
            .parse()
            .map_err(|e| format!("unreadable W1 time from the script: {e}"))
    }

    /// W2 for `preset`: the median of `repeats` training steps after `warmup`.
    pub fn w2(
        &mut self,
        preset: &str,
        warmup: usize,
        repeats: usize,
    ) -> Result<TorchStepRow, String> {
        let answer = self.ask(&format!("w2 {preset} {warmup} {repeats}"))?;
        serde_json::from_str(&answer).map_err(|e| format!("unreadable W2 row from the script: {e}"))
    }

    fn ask(&mut self, request: &str) -> Result<String, String> {
        writeln!(self.requests, "{request}")
            .and_then(|()| self.requests.flush())
            .map_err(|e| format!("the PyTorch script stopped ({e})"))?;
        self.answer()
    }

    fn answer(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.answers.read_line(&mut line) {
            Ok(0) => Err("the PyTorch script stopped (see its error above)".to_string()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("cannot read the PyTorch script's answer: {e}")),
        }
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        let _ = writeln!(self.requests, "quit").and_then(|()| self.requests.flush());
        let _ = self.child.wait();
    }
}
