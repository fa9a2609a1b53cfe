//! Smoke test of `moe-bench --quick`: it still runs, prints every row and writes every figure.
//! It checks shapes and completeness, never speed (BENCHMARKS.md holds the timings). PyTorch's
//! side is a stand-in for `bench/torch_moe.py --serve` that answers with fixed times, so the
//! exchange with the script and the ratios built from it are checked without torch.

use std::process::Command;

use serde_json::Value;

/// Rows the quick run must produce: W1 for top-1 and top-2, a dense row each plus E in
/// {4, 8, 64} with and without capacity; W2 for the `tiny` preset (the quick run leaves `small`
/// out); W3 for the dense shape and the two E=8 top-2 buffers.
const QUICK_EXPERTS: [u64; 3] = [4, 8, 64];

/// Seconds the stand-in reports for a W1 run: the first run of each configuration (the quick
/// run's warm-up round) is `WARMUP_SECONDS`, every later one `MEASURED_SECONDS`.
const WARMUP_SECONDS: f64 = 9.0;
const MEASURED_SECONDS: f64 = 0.5;
/// Tokens per second the stand-in reports for W2.
const STEP_TOKENS_PER_SECOND: f64 = 2048.0;

/// A "python" that ignores the script it is given and speaks its `--serve` protocol: two W1
/// configurations (the top-1 dense FFN and E=4 top-1 dropless in the sorted form), then
/// answers until `quit`.
#[cfg(unix)]
fn stand_in_python(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-python");
    let script = format!(
        r#"#!/bin/sh
echo '{{"torch": "stand-in", "threads": 2, "w1": [{{"form": "dense", "experts": 1, "top_k": 1, "capacity": "-"}}, {{"form": "sorted", "experts": 4, "top_k": 1, "capacity": "dropless"}}]}}'
while read request a b c; do
  case "$request" in
    w1)
      eval "seen=\${{seen_$a:-0}}"
      if [ "$seen" = 0 ]; then echo {WARMUP_SECONDS}; eval "seen_$a=1"; else echo {MEASURED_SECONDS}; fi ;;
    w2) echo '{{"preset": "'"$a"'", "seconds": 0.5, "tokens_per_second": {STEP_TOKENS_PER_SECOND}, "parameters": 1}}' ;;
    *) exit 0 ;;
  esac
done
"#
    );
    std::fs::write(&path, script).expect("stand-in written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Runs `command` (a moe-bench invocation writing JSON to `json_path`), requires success, and
/// gives its standard output and the report, the file removed.
fn report_of(mut command: Command, json_path: &std::path::Path) -> (String, Value) {
    let output = command.output().expect("moe-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "moe-bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(json_path).expect("JSON written"))
            .expect("valid JSON");
    let _ = std::fs::remove_file(json_path);
    (stdout, report)
}

#[test]
fn quick_run_prints_and_writes_every_row() {
    let json_path =
        std::env::temp_dir().join(format!("moe-bench-smoke-{}.json", std::process::id()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_moe-bench"));
    command
        .args(["--backend", "flex", "--quick", "--json"])
        .arg(&json_path);
    #[cfg(unix)]
    let stand_in_dir = std::env::temp_dir().join(format!("moe-bench-smoke-{}", std::process::id()));
    #[cfg(unix)]
    {
        std::fs::create_dir_all(&stand_in_dir).expect("temp dir");
        command
            .arg("--torch-python")
            .arg(stand_in_python(&stand_in_dir));
    }
    #[cfg(not(unix))]
    command.arg("--no-torch");
    let (stdout, report) = report_of(command, &json_path);
    #[cfg(unix)]
    let _ = std::fs::remove_dir_all(&stand_in_dir);

    let w1 = report["w1"].as_array().expect("w1 rows");
    for top_k in [1u64, 2] {
        let of_k = |kind: &str, experts: u64, capacity: &str| {
            w1.iter()
                .filter(|r| {
                    r["kind"] == kind
                        && r["experts"] == experts
                        && r["top_k"] == top_k
                        && r["capacity"] == capacity
                })
                .count()
        };
        assert_eq!(of_k("dense", 1, "-"), 1, "dense row for top-{top_k}");
        for experts in QUICK_EXPERTS {
            for capacity in ["dropless", "capacity 1.25"] {
                assert_eq!(
                    of_k("moe", experts, capacity),
                    1,
                    "W1 row E={experts} top-{top_k} {capacity}"
                );
                // The printed table has the same row.
                let printed = stdout.lines().any(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    words.len() > 3
                        && words[0] == "moe"
                        && words[1] == experts.to_string()
                        && words[2] == top_k.to_string()
                        && line.contains(capacity)
                });
                assert!(
                    printed,
                    "no printed row E={experts} top-{top_k} {capacity}\n{stdout}"
                );
            }
        }
    }
    assert_eq!(w1.len(), 2 * (1 + 2 * QUICK_EXPERTS.len()));
    for row in w1 {
        let seconds = row["seconds"].as_f64().expect("seconds");
        assert!(seconds.is_finite() && seconds > 0.0, "bad time in {row}");
        // A dropless buffer holds at least the average load; a capped one exactly the capacity.
        let (experts, top_k) = (
            row["experts"].as_u64().unwrap(),
            row["top_k"].as_u64().unwrap(),
        );
        let slots = row["capacity_slots"].as_u64().expect("slots");
        let average = (4096 * top_k).div_ceil(experts);
        match row["capacity"].as_str().unwrap() {
            "capacity 1.25" => assert_eq!(slots, (4096 * top_k * 5).div_ceil(4 * experts)),
            "dropless" => assert!(slots >= average && slots <= 4096, "slots {slots} in {row}"),
            _ => assert_eq!(slots, 4096),
        }
    }

    let presets: Vec<&str> = report["w2"]
        .as_array()
        .expect("w2 rows")
        .iter()
        .map(|r| r["preset"].as_str().unwrap())
        .collect();
    assert_eq!(presets, ["tiny"]);
    assert_eq!(report["w3"].as_array().expect("w3 rows").len(), 3);
    for key in [
        "p1_moe_efficiency",
        "p2_expert_scaling",
        "p3_vs_pytorch",
        "p4_gemm_efficiency",
        "peak_rss_ratio",
    ] {
        assert!(report[key].is_object(), "no {key} in the report");
    }
    assert_eq!(report["p1_moe_efficiency"].as_object().unwrap().len(), 4);
    assert_eq!(report["p2_expert_scaling"].as_object().unwrap().len(), 4);
    assert_eq!(report["p4_gemm_efficiency"].as_object().unwrap().len(), 2);
    #[cfg(unix)]
    check_torch_side(&report);
    #[cfg(not(unix))]
    assert!(stdout.contains("W4: PyTorch not measured: --no-torch"));
}

/// PyTorch's rows are the stand-in's measured (not warm-up) answers, and P3 divides ours by them.
#[cfg(unix)]
fn check_torch_side(report: &Value) {
    let torch_w1 = report["w4"]["w1"].as_array().expect("PyTorch W1 rows");
    assert_eq!(torch_w1.len(), 2, "{torch_w1:?}");
    for row in torch_w1 {
        assert_eq!(row["seconds"].as_f64(), Some(MEASURED_SECONDS), "{row}");
    }
    let ours = |kind: &str, experts: u64, capacity: &str| -> f64 {
        report["w1"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["kind"] == kind
                    && r["experts"] == experts
                    && r["top_k"] == 1
                    && r["capacity"] == capacity
            })
            .and_then(|r| r["tokens_per_second"].as_f64())
            .expect("our row")
    };
    let torch_tokens_per_second = 4096.0 / MEASURED_SECONDS;
    let p3 = report["p3_vs_pytorch"].as_object().expect("P3");
    let expect = |key: &str, ours: f64| {
        let ratio = p3[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key} in {p3:?}"));
        assert!((ratio - ours).abs() < 1e-3, "{key}: {ratio} against {ours}");
    };
    expect(
        "W1_E4_top1_dropless",
        ours("moe", 4, "dropless") / torch_tokens_per_second,
    );
    expect(
        "W1_dense_hidden1024",
        ours("dense", 1, "-") / torch_tokens_per_second,
    );
    let our_step = report["w2"][0]["tokens_per_second"]
        .as_f64()
        .expect("W2 tiny");
    expect("W2_tiny", our_step / STEP_TOKENS_PER_SECOND);
    // Only the configurations the script measured have a ratio.
    assert_eq!(p3.len(), 3, "{p3:?}");
}

/// `--only w6-ops` times every operation of each of W6's layers taken apart, and the sum of
/// the counted ones (the router's parts are shown but not counted).
#[test]
fn w6_ops_lists_every_operation_of_every_layer() {
    let json_path =
        std::env::temp_dir().join(format!("moe-bench-w6-ops-{}.json", std::process::id()));
    let mut command = Command::new(env!("CARGO_BIN_EXE_moe-bench"));
    command
        .args(["--backend", "flex", "--quick", "--only", "w6-ops", "--json"])
        .arg(&json_path);
    let (_, report) = report_of(command, &json_path);
    let rows = report["w6_ops"].as_array().expect("w6_ops rows");
    let operations = |experts: u64| -> Vec<&str> {
        rows.iter()
            .filter(|row| row["experts"] == experts)
            .map(|row| row["operation"].as_str().expect("a name"))
            .collect()
    };
    let dense = operations(1);
    for name in [
        "up product",
        "activation",
        "down product",
        "layer",
        "sum of the operations",
    ] {
        assert!(dense.contains(&name), "dense layer lacks {name}: {dense:?}");
    }
    for experts in [16, 64] {
        let moe = operations(experts);
        for name in [
            "router (gate and balancing loss)",
            "  router: top-k",
            "plan",
            "dispatch (gather)",
            "up product",
            "down product",
            "combine",
            "layer",
            "sum of the operations",
        ] {
            assert!(
                moe.contains(&name),
                "{experts}-expert layer lacks {name}: {moe:?}"
            );
        }
    }
    for row in rows {
        for field in ["forward_ms", "backward_ms"] {
            let value = row[field].as_f64().expect("a number");
            assert!(
                value.is_finite() && value >= 0.0,
                "{row}: {field} = {value}"
            );
        }
    }
}
