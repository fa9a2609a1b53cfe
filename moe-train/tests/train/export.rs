//! `burn-moe export` of a trained checkpoint: the folder's tensors against the checkpoint's
//! parameters, the config read back, and the refusals.

use burn::module::Module;
use burn_store::{bridge, ModuleStore, SafetensorsStore};
use moe_models::MoeTransformerConfig;
use moe_train::cli::{ExportArgs, HfArch};
use moe_train::commands::export::{export, ExportLayout};
use moe_train::training::{train, RunOptions};

use crate::common::{temp_dir, tiny_config, write_generated_corpus};

#[test]
fn a_checkpoint_exports_under_our_names_and_refuses_what_it_cannot_do() {
    let _serial = crate::common::serial();
    let dir = temp_dir("export");
    let corpus = dir.join("corpus.txt");
    write_generated_corpus(&corpus);
    let run = dir.join("run");
    train(tiny_config(corpus, 3), RunOptions::new(run.clone())).unwrap();
    let args = |out: &str, arch| ExportArgs {
        checkpoint: run.clone(),
        out: dir.join(out),
        arch,
        no_verify: false,
        backend: moe_train::runtime::backend::BackendChoice::Ndarray,
        weights: None,
        adapters: false,
    };

    // The trainer's models (GELU experts, adjacent rotary pairs) fit no Hugging Face layout.
    assert_eq!(export(&args("ours", None)).unwrap(), ExportLayout::BurnMoe);
    let out = dir.join("ours");
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    let config: MoeTransformerConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(config.decoder.num_layers, 2);
    assert!(out.join("tokenizer.json").exists());

    // Every tensor of the file is the checkpoint's parameter of that name.
    let opened =
        moe_train::store::checkpoint::open(&run, moe_train::store::checkpoint::Verify::Checked)
            .unwrap();
    #[allow(deprecated)] // ndarray, as the run trained on
    let device = burn::tensor::Device::ndarray();
    let model =
        moe_train::commands::load_finite(&opened.folder, config.init(&device).unwrap()).unwrap();
    let mut store = SafetensorsStore::from_file(out.join("model.safetensors"));
    let names = store.keys().unwrap();
    assert!(
        names.contains(&"stack.blocks.1.ffn.moe.experts.w_in".to_string()),
        "{names:?}"
    );
    let ours = burn_store::ModuleSnapshot::collect(&model, None, None, false);
    assert_eq!(names.len(), ours.len());
    for snapshot in ours {
        let stored = bridge::to_data(store.get_tensor(&snapshot.name).unwrap().unwrap()).unwrap();
        assert_eq!(
            stored,
            bridge::to_data(&snapshot).unwrap(),
            "{}",
            snapshot.name
        );
    }
    assert!(model.num_params() > 0);

    // Asking for a layout the model does not fit names why; a full folder is left alone.
    let error = export(&args("mixtral", Some(HfArch::Mixtral))).unwrap_err();
    assert!(error.to_string().contains("MixtralForCausalLM"), "{error}");
    let error = export(&args("ours", None)).unwrap_err();
    assert!(error.to_string().contains("not empty"), "{error}");
}
