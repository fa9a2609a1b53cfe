//! Smoke test of `moe-bench --quick`: it still runs, prints every row and writes every figure.
//! It checks shapes and completeness, never speed (BENCHMARKS.md holds the timings).

use std::process::Command;

use serde_json::Value;

/// Rows the quick run must produce: W1 for top-1 and top-2, a dense row each plus E in
/// {4, 8, 64} with and without capacity; W2 for the `tiny` preset (the quick run leaves `small`
/// out); W3 for the dense shape and the two E=8 top-2 buffers.
const QUICK_EXPERTS: [u64; 3] = [4, 8, 64];

#[test]
fn quick_run_prints_and_writes_every_row() {
    let json_path =
        std::env::temp_dir().join(format!("moe-bench-smoke-{}.json", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_moe-bench"))
        .args(["--backend", "flex", "--quick", "--no-torch", "--json"])
        .arg(&json_path)
        .output()
        .expect("moe-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "moe-bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("JSON written"))
            .expect("valid JSON");
    let _ = std::fs::remove_file(&json_path);

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
    assert!(stdout.contains("W4: PyTorch not measured: --no-torch"));
}
