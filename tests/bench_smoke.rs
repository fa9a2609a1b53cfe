//! Smoke test of `moe-bench --quick`: it still runs, prints every row and writes every figure.
//! It checks shapes and completeness, never speed (BENCHMARKS.md holds the timings). PyTorch's
//! side is a stand-in for `bench/torch_moe.py --serve` that answers with fixed times, so the
//! exchange with the script and the ratios built from it are checked without torch.

use std::process::Command;

use burn_moe::bench::{row_of, Capacity, LayerKey, Report, TorchSide, TOKENS};
use serde_json::Value;

/// Rows the quick run must produce: W1 for top-1 and top-2, a dense row each plus E in
/// {4, 8, 64} with and without capacity; W2 for the `tiny` preset (the quick run leaves `small`
/// out); W3 for the dense shape and the two E=8 top-2 buffers.
const QUICK_EXPERTS: [usize; 3] = [4, 8, 64];

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

    let report: Report = serde_json::from_value(report).expect("the report's own types read it");
    let w1 = &report.w1;
    let count = |key: LayerKey| w1.iter().filter(|row| row.key == key).count();
    for top_k in [1, 2] {
        assert_eq!(
            count(LayerKey::dense(top_k)),
            1,
            "dense row for top-{top_k}"
        );
        for experts in QUICK_EXPERTS {
            for capacity in Capacity::LIMITS {
                let key = LayerKey::moe(experts, top_k, capacity);
                assert_eq!(count(key), 1, "W1 row {key:?}");
                // The printed table has the same row.
                let printed = stdout.lines().any(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    words.len() > 3
                        && words[0] == "moe"
                        && words[1] == experts.to_string()
                        && words[2] == top_k.to_string()
                        && line.contains(capacity.label())
                });
                assert!(printed, "no printed row {key:?}\n{stdout}");
            }
        }
    }
    assert_eq!(w1.len(), 2 * (1 + 2 * QUICK_EXPERTS.len()));
    for row in w1 {
        assert!(
            row.seconds.is_finite() && row.seconds > 0.0,
            "bad time in {row:?}"
        );
        // A dropless buffer holds at least the average load; a capped one exactly the capacity.
        let (experts, top_k, slots) = (row.key.experts, row.key.top_k, row.capacity_slots);
        let average = (TOKENS * top_k).div_ceil(experts);
        match row.key.capacity {
            Capacity::Factor125 => assert_eq!(slots, (TOKENS * top_k * 5).div_ceil(4 * experts)),
            Capacity::Dropless => assert!(slots >= average && slots <= TOKENS, "{row:?}"),
            Capacity::Unlimited => assert_eq!(slots, TOKENS),
        }
    }

    let presets: Vec<&str> = report.w2.iter().map(|r| r.preset.as_str()).collect();
    assert_eq!(presets, ["tiny"]);
    assert_eq!(report.w3.len(), 3);
    let ratios = &report.ratios;
    assert_eq!(ratios.p1_moe_efficiency.len(), 4);
    assert_eq!(ratios.p2_expert_scaling.len(), 4);
    assert_eq!(ratios.p4_gemm_efficiency.len(), 2);
    // P1 divides the MoE row's tokens/s by the dense row's, looked up here by key.
    let tokens_per_second = |key: LayerKey| row_of(w1, key).expect("a row").tokens_per_second;
    let moe = LayerKey::moe(8, 2, Capacity::Dropless);
    let expected = tokens_per_second(moe) / tokens_per_second(LayerKey::dense(2));
    assert!((ratios.p1_moe_efficiency[&moe.name()] - expected).abs() < 1e-3);
    #[cfg(unix)]
    check_torch_side(&report);
    #[cfg(not(unix))]
    assert!(stdout.contains("W4: PyTorch not measured: --no-torch"));
}

/// PyTorch's rows are the stand-in's measured (not warm-up) answers, and P3 divides ours by them.
#[cfg(unix)]
fn check_torch_side(report: &Report) {
    let TorchSide::Measured(torch) = &report.w4 else {
        panic!("PyTorch's side not measured: {:?}", report.w4);
    };
    assert_eq!(torch.w1.len(), 2, "{:?}", torch.w1);
    for row in &torch.w1 {
        assert_eq!(row.seconds, MEASURED_SECONDS, "{row:?}");
    }
    let ours = |key: LayerKey| row_of(&report.w1, key).expect("our row").tokens_per_second;
    let torch_tokens_per_second = TOKENS as f64 / MEASURED_SECONDS;
    let p3 = &report.ratios.p3_vs_pytorch;
    let expect = |name: String, ours: f64| {
        let ratio = p3
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} in {p3:?}"));
        assert!(
            (ratio - ours).abs() < 1e-3,
            "{name}: {ratio} against {ours}"
        );
    };
    for key in [LayerKey::moe(4, 1, Capacity::Dropless), LayerKey::dense(1)] {
        expect(
            format!("W1_{}", key.name()),
            ours(key) / torch_tokens_per_second,
        );
    }
    expect(
        "W2_tiny".into(),
        report.w2[0].tokens_per_second / STEP_TOKENS_PER_SECOND,
    );
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
