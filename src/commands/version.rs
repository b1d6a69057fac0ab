//! `nodedrain version`: what was built, and for which Kubernetes API.

use std::process::ExitCode;

use clap::Args;
use serde::Serialize;

use crate::cli::OutputFormat;

#[derive(Debug, Clone, Args)]
pub struct VersionArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Version {
    pub version: &'static str,
    /// `NODEDRAIN_GIT_COMMIT` at build time (the Dockerfile passes its build argument), else
    /// `unknown`.
    pub git_commit: &'static str,
    /// `release` or `debug`.
    pub build: &'static str,
    pub platform: String,
    /// The Kubernetes API version nodedrain's types were generated for (k8s-openapi's feature):
    /// the version it is tested against; newer apiservers serve the same stable APIs.
    pub kubernetes_api: &'static str,
}

/// The Kubernetes version of the enabled k8s-openapi feature. Exactly one is enabled (the
/// crate's build script refuses otherwise), so `v` is assigned once; a k8s-openapi that
/// supports a version not listed here fails to compile this until it is added.
// The macros leave exactly one assignment, which clippy sees as a late initialisation.
#[allow(clippy::needless_late_init)]
pub fn kubernetes_api() -> &'static str {
    let v: &'static str;
    k8s_openapi::k8s_if_1_33! { v = "1.33"; }
    k8s_openapi::k8s_if_1_34! { v = "1.34"; }
    k8s_openapi::k8s_if_1_35! { v = "1.35"; }
    k8s_openapi::k8s_if_1_36! { v = "1.36"; }
    k8s_openapi::k8s_if_1_37! { v = "1.37"; }
    v
}

pub fn version() -> Version {
    Version {
        version: env!("CARGO_PKG_VERSION"),
        git_commit: option_env!("NODEDRAIN_GIT_COMMIT").unwrap_or("unknown"),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        platform: format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        kubernetes_api: kubernetes_api(),
    }
}

pub fn run(args: VersionArgs) -> ExitCode {
    let v = version();
    let text = match args.output {
        OutputFormat::Json => match serde_json::to_string_pretty(&v) {
            Ok(json) => format!("{json}\n"),
            Err(e) => {
                eprintln!("nodedrain version: {e}");
                return ExitCode::FAILURE;
            }
        },
        OutputFormat::Text => format!(
            "nodedrain {} ({}, commit {}, {})\nKubernetes API: v{}\n",
            v.version, v.build, v.git_commit, v.platform, v.kubernetes_api
        ),
    };
    super::completion::write_stdout(text.as_bytes(), "version")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_version_is_the_k8s_openapi_feature_in_cargo_toml() {
        let manifest = include_str!("../../Cargo.toml");
        let feature = format!("\"v{}\"", kubernetes_api().replace('.', "_"));
        assert!(
            manifest
                .lines()
                .any(|l| l.starts_with("k8s-openapi") && l.contains(&feature)),
            "Cargo.toml does not enable {feature}"
        );
        assert_eq!(version().version, env!("CARGO_PKG_VERSION"));
    }
}
