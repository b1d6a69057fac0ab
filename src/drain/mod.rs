//! The drain engine: pure planning (`policy`, `plan`) and, at the edge, execution against the API.

pub mod evict;
pub mod execute;
pub mod pdb_feed;
pub mod plan;
pub mod policy;
pub mod report;
pub mod surge;
