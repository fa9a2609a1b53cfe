//! From files to batches: corpora ([`corpus`]), the validation split ([`split`]), the
//! tokenizer ([`tokenizer`]), token streams and batches ([`batches`]), and the tasks that
//! turn them into losses ([`tasks`]: text and digits).

pub mod batches;
pub mod corpus;
pub mod split;
pub mod tasks;
pub mod tokenizer;
