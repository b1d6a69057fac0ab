//! The drain engine: pure planning (`policy`, `plan`) and decisions (`machine`), and at the edge
//! the executor that carries them out against the API (`execute`).

pub mod events;
pub mod evict;
pub mod execute;
pub mod machine;
pub mod pdb_feed;
pub mod plan;
pub mod policy;
pub mod report;
pub mod surge;
