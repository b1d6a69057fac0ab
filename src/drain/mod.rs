//! The drain engine: pure planning (`policy`, `plan`) and, at the edge, execution against the API.

pub mod plan;
pub mod policy;
