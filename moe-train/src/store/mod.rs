//! What a run keeps on disk: the run folder it owns ([`run_dir`]), its checkpoints
//! ([`checkpoint`], with the proof of their files in [`manifest`] and the gathered state of
//! placed experts in [`sharded_state`]), the metrics log ([`metrics`]) and the plots drawn
//! from it ([`plots`]).

pub mod checkpoint;
pub mod manifest;
pub mod metrics;
pub mod plots;
pub mod run_dir;
pub mod sharded_state;
