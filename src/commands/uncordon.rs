//! `nodedrain uncordon`: `kubectl uncordon` plus removing nodedrain's taint, label and record.

use std::process::ExitCode;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::cli::UncordonArgs;
use crate::kube_client;
use crate::node;

/// A few patches; the limit hardly matters.
const UNCORDON_QPS: f64 = 20.0;

pub async fn run(args: UncordonArgs) -> ExitCode {
    let client = match kube_client::connect(&args.client, UNCORDON_QPS).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let api: Api<Node> = Api::all(client);
    let mut failed = false;
    // Each node on its own: one missing node must not keep the others cordoned.
    for name in &args.nodes {
        match node::release(&api, name).await {
            Ok(true) => println!("node/{name} uncordoned"),
            Ok(false) => println!("node/{name} already uncordoned"),
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
