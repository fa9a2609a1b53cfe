//! Where the work runs: the backend chooser (the one place a backend is picked), heap reuse
//! and compute threads for the CPU backends, and the memory check that refuses a model and
//! batch that cannot fit before anything is allocated.

pub mod allocator;
pub mod backend;
pub mod memory;
pub mod threads;
