//! PNG plots of a run: the loss curves and expert-load heatmaps (layer x expert over time),
//! drawn with `plotters` from the metrics log.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::store::metrics::{Row, TrainRow};

/// Fonts tried for labels, in order (`BURN_MOE_FONT` first).
const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a label font once; false when none was found (plots are then drawn unlabelled).
pub(crate) fn fonts() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let custom = std::env::var("BURN_MOE_FONT").ok();
        for path in custom.iter().map(String::as_str).chain(FONT_PATHS) {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws `loss.png` and the expert-load heatmap(s) into `run_dir`; returns the files written.
/// Plotting problems are reported, never fatal.
pub fn draw(run_dir: &Path, rows: &[Row]) -> Vec<PathBuf> {
    let labels = fonts();
    let train: Vec<&TrainRow> = rows
        .iter()
        .filter_map(|row| match row {
            Row::Train(row) => Some(row),
            Row::Eval(_) => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|row| match row {
            Row::Eval(row) => Some((row.step as f64, row.val_loss)),
            Row::Train(_) => None,
        })
        .collect();
    let mut written = Vec::new();
    let mut attempt = |name: &str, result: Result<(), String>| match result {
        Ok(()) => written.push(run_dir.join(name)),
        Err(error) => eprintln!("warning: could not draw {name}: {error}"),
    };
    if !train.is_empty() {
        let curve: Vec<(f64, f64)> = train
            .iter()
            .map(|r| (r.step as f64, r.cross_entropy))
            .collect();
        attempt(
            "loss.png",
            loss_plot(&run_dir.join("loss.png"), &curve, &eval, labels),
        );
        let load: Vec<&Vec<Vec<f64>>> = train.iter().map(|r| &r.expert_load).collect();
        if load.iter().any(|l| !l.is_empty()) {
            attempt(
                "expert_load.png",
                heatmap(
                    &run_dir.join("expert_load.png"),
                    "expert load (all tokens)",
                    &train,
                    &load,
                    labels,
                ),
            );
        }
        let image: Vec<&Vec<Vec<f64>>> = train
            .iter()
            .filter_map(|r| r.image_expert_load.as_ref())
            .collect();
        let text: Vec<&Vec<Vec<f64>>> = train
            .iter()
            .filter_map(|r| r.text_expert_load.as_ref())
            .collect();
        if image.len() == train.len() && image.iter().any(|l| !l.is_empty()) {
            attempt(
                "expert_load_image.png",
                heatmap(
                    &run_dir.join("expert_load_image.png"),
                    "expert load (image tokens)",
                    &train,
                    &image,
                    labels,
                ),
            );
            attempt(
                "expert_load_text.png",
                heatmap(
                    &run_dir.join("expert_load_text.png"),
                    "expert load (text tokens)",
                    &train,
                    &text,
                    labels,
                ),
            );
        }
    }
    written
}

fn loss_plot(
    path: &Path,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    labels: bool,
) -> Result<(), String> {
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max_step = train.iter().chain(eval).map(|p| p.0).fold(1.0, f64::max);
    let max_loss = train.iter().chain(eval).map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let min_loss = train
        .iter()
        .chain(eval)
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .min(max_loss)
        * 0.95;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption("cross-entropy", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..max_step, min_loss..max_loss)
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|step| whole_number(*step))
            .y_desc("nats per token")
            .draw()
            .map_err(|e| e.to_string())?;
    }
    let train_series = chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    if labels {
        train_series
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !eval.is_empty() {
        let val = chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if labels {
            val.label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| e.to_string())?;
    }
    if labels {
        draw_legend(&mut chart)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// A line chart with `f64` axes on a PNG.
pub(crate) type LineChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The legend of the series labelled so far, on a white box.
pub(crate) fn draw_legend<'a, 'b: 'a>(chart: &mut LineChart<'a, 'b>) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// One panel per MoE layer, stacked: rows are the layer's experts, columns the logged steps,
/// colour the load relative to a perfectly balanced expert (white = balanced, blue = idle,
/// red = twice the fair share or more).
fn heatmap(
    path: &Path,
    title: &str,
    train: &[&TrainRow],
    load: &[&Vec<Vec<f64>>],
    labels: bool,
) -> Result<(), String> {
    let layers = load[0].len();
    let experts = load[0].first().map_or(0, Vec::len);
    if layers * experts == 0 {
        return Ok(());
    }
    // Tall enough that a 64-expert layer shows every expert as a band of its own.
    let panel = (experts * 4 + 80).clamp(160, 440);
    let root = BitMapBackend::new(path, (1000, (50 + layers * panel) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = if labels {
        let title = format!("{title}; white: fair share, red: 2x or more, blue: idle");
        root.titled(&title, ("sans-serif", 20))
            .map_err(|e| e.to_string())?
    } else {
        root.clone()
    };
    let steps: Vec<usize> = train.iter().map(|r| r.step).collect();
    for (layer, area) in panels.split_evenly((layers, 1)).iter().enumerate() {
        layer_panel(area, layer, &steps, load, labels)?;
    }
    root.present().map_err(|e| e.to_string())
}

/// The heatmap panel of MoE layer `layer`: its experts' load at each logged step.
fn layer_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    layer: usize,
    steps: &[usize],
    load: &[&Vec<Vec<f64>>],
    labels: bool,
) -> Result<(), String> {
    let experts = load[0][layer].len();
    let mut builder = ChartBuilder::on(area);
    builder.margin(8);
    if labels {
        builder
            .caption(format!("MoE layer {layer}"), ("sans-serif", 16))
            .x_label_area_size(36)
            .y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(0..load.len(), (0..experts).into_segmented())
        .map_err(|e| e.to_string())?;
    if labels {
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("expert")
            .x_label_formatter(&|c| steps.get(*c).map_or(String::new(), |s| s.to_string()))
            .y_label_formatter(&|r| match r {
                SegmentValue::CenterOf(expert) if *expert < experts => expert.to_string(),
                _ => String::new(),
            })
            .y_labels(experts.min(16))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series(load.iter().enumerate().flat_map(|(column, layer_loads)| {
            let shares = layer_loads.get(layer).map_or(&[][..], Vec::as_slice);
            shares.iter().enumerate().map(move |(expert, &share)| {
                let relative = share * experts as f64; // 1.0 = fair share
                Rectangle::new(
                    [
                        (column, SegmentValue::Exact(expert)),
                        (column + 1, SegmentValue::Exact(expert + 1)),
                    ],
                    load_colour(relative).filled(),
                )
            })
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws generated digit images as a grid, a row per numeral: `images` holds `(digit, pixel
/// levels)` pairs, 8x8 each, in `[0, levels)`; each pixel a 6x6 grey square, bright on dark.
pub fn digit_grid(
    path: &Path,
    images: &[(usize, Vec<usize>)],
    levels: usize,
) -> Result<(), String> {
    const CELL: usize = 6;
    const SIDE: usize = moe_models::digits::IMAGE_SIZE;
    const GAP: usize = 8;
    let columns = (0..10)
        .map(|digit| images.iter().filter(|(d, _)| *d == digit).count())
        .max()
        .unwrap_or(0)
        .max(1);
    let tile = SIDE * CELL + GAP;
    let (width, height) = (GAP + columns * tile, GAP + 10 * tile);
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut next_column = [0usize; 10];
    for (digit, pixels) in images {
        let digit = digit % 10;
        let (x0, y0) = (GAP + next_column[digit] * tile, GAP + digit * tile);
        next_column[digit] += 1;
        for (index, &level) in pixels.iter().enumerate().take(SIDE * SIDE) {
            let grey = (255 * level.min(levels - 1) / (levels - 1).max(1)) as u8;
            let (x, y) = (x0 + (index % SIDE) * CELL, y0 + (index / SIDE) * CELL);
            root.draw(&Rectangle::new(
                [(x as i32, y as i32), ((x + CELL) as i32, (y + CELL) as i32)],
                RGBColor(grey, grey, grey).filled(),
            ))
            .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}

/// White at the fair share, towards blue when idle, towards red when overloaded (2x = red).
fn load_colour(relative: f64) -> RGBColor {
    if relative < 1.0 {
        let t = (1.0 - relative).clamp(0.0, 1.0);
        RGBColor(
            (255.0 * (1.0 - t)) as u8,
            (255.0 * (1.0 - 0.6 * t)) as u8,
            255,
        )
    } else {
        let t = (relative - 1.0).clamp(0.0, 1.0);
        RGBColor(255, (255.0 * (1.0 - t)) as u8, (255.0 * (1.0 - t)) as u8)
    }
}

/// An axis value that counts something (steps, seconds), without a fraction: `100`, not
/// `100.0`.
pub fn whole_number(value: f64) -> String {
    format!("{value:.0}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training row whose experts alternate between twice the fair share and idle.
    fn row(step: usize, layers: usize, experts: usize) -> TrainRow {
        let share =
            |expert: usize| if expert.is_multiple_of(2) { 2.0 } else { 0.0 } / experts as f64;
        TrainRow {
            step,
            loss: 3.0,
            cross_entropy: 3.0,
            aux_loss: 0.0,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_second: 1.0,
            expert_load: vec![(0..experts).map(share).collect(); layers],
            dropped: vec![0.0; layers],
            image_expert_load: None,
            text_expert_load: None,
            loss_scale: None,
            skipped_steps: None,
            non_finite_skipped: None,
        }
    }

    /// The runs of strongly coloured pixels (red or blue, not white, grey or black text) down
    /// the image's middle column, each as the number of colour changes inside it.
    fn coloured_runs(path: &Path) -> Vec<usize> {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buffer = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buffer).unwrap();
        let channels = info.line_size / info.width as usize;
        let x = info.width as usize / 2;
        let mut runs = Vec::new();
        let (mut length, mut changes, mut previous) = (0, 0, None);
        for y in 0..info.height as usize {
            let at = y * info.line_size + x * channels;
            let pixel = &buffer[at..at + 3];
            let spread = pixel.iter().max().unwrap() - pixel.iter().min().unwrap();
            if spread > 150 {
                let red = pixel[0] > pixel[2];
                if previous.is_some_and(|was| was != red) {
                    changes += 1;
                }
                previous = Some(red);
                length += 1;
            } else {
                if length >= 20 {
                    runs.push(changes);
                }
                (length, changes, previous) = (0, 0, None);
            }
        }
        if length >= 20 {
            runs.push(changes);
        }
        runs
    }

    #[test]
    fn the_expert_load_heatmap_has_a_panel_per_moe_layer_with_every_expert_visible() {
        let dir = std::env::temp_dir().join(format!("burn-moe-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows: Vec<Row> = (1..=12)
            .map(|step| Row::Train(row(10 * step, 3, 64)))
            .collect();
        let written = draw(&dir, &rows);
        assert!(
            written.contains(&dir.join("expert_load.png")),
            "{written:?}"
        );
        let runs = coloured_runs(&dir.join("expert_load.png"));
        // Three panels; in each, the 64 experts' alternating bands: 63 changes of colour.
        assert_eq!(runs, vec![63, 63, 63]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
