//! Runs a process under the chart's resource limits: a cgroup (v1) with the memory limit and CPU
//! quota of `resources.limits` in charts/nodedrain/values.yaml, as the kubelet would set them for
//! the controller's container, and what the kernel counted there (OOM kills, throttling).
//!
//! The kubelet turns `limits.memory` into `memory.limit_in_bytes` and `limits.cpu` into a CFS
//! quota of `cpu × cpu.cfs_period_us` per period (100 ms by default). Needs root and the v1
//! `memory` and `cpu` controllers mounted under /sys/fs/cgroup, as on these machines.

use std::path::{Path, PathBuf};
use std::process::Command;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period the kubelet uses.
const CFS_PERIOD_US: u64 = 100_000;

/// The controller's `resources.limits` from the chart's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartLimits {
    pub memory_bytes: u64,
    /// In cores (`"500m"` is 0.5).
    pub cpu_cores: f64,
}

impl ChartLimits {
    /// Read from the chart this checkout ships: the limits that a `helm install` with default
    /// values gives the controller.
    pub fn from_values() -> Result<ChartLimits, String> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/nodedrain/values.yaml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_yaml(&text)
    }

    pub fn from_yaml(text: &str) -> Result<ChartLimits, String> {
        let values: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| format!("values.yaml: {e}"))?;
        let limits = &values["resources"]["limits"];
        let memory =
            quantity_text(&limits["memory"]).ok_or("resources.limits.memory is not set")?;
        let cpu = quantity_text(&limits["cpu"]).ok_or("resources.limits.cpu is not set")?;
        Ok(ChartLimits {
            memory_bytes: memory_bytes(&memory)?,
            cpu_cores: cpu_cores(&cpu)?,
        })
    }
}

fn quantity_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A Kubernetes memory quantity (`256Mi`, `1G`, `134217728`) in bytes.
pub fn memory_bytes(text: &str) -> Result<u64, String> {
    const SUFFIXES: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, unit) = SUFFIXES
        .iter()
        .find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((text, 1));
    number
        .parse::<f64>()
        .map(|n| (n * unit as f64) as u64)
        .map_err(|_| format!("memory quantity {text:?} is not understood"))
}

/// A Kubernetes CPU quantity (`"1"`, `"500m"`, `1.5`) in cores.
pub fn cpu_cores(text: &str) -> Result<f64, String> {
    let parsed = match text.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().map(|m| m / 1000.0),
        None => text.parse::<f64>(),
    };
    parsed.map_err(|_| format!("cpu quantity {text:?} is not understood"))
}

/// A memory and a cpu cgroup of one name; removed when dropped (once its processes are gone).
pub struct Cgroup {
    memory: PathBuf,
    cpu: PathBuf,
    pub limits: ChartLimits,
}

/// What the kernel counted in the cgroup.
#[derive(Debug, Clone, Default)]
pub struct CgroupStats {
    /// Peak memory charged to the cgroup (RSS and page cache of its processes).
    pub max_usage_bytes: u64,
    /// Times an allocation hit the limit (the kernel reclaimed or killed).
    pub failcnt: u64,
    /// Processes the OOM killer killed in the cgroup.
    pub oom_kills: u64,
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_seconds: f64,
}

impl Cgroup {
    pub fn create(name: &str, limits: ChartLimits) -> Result<Cgroup, String> {
        let memory = Path::new(CGROUP_ROOT).join("memory").join(name);
        let cpu = Path::new(CGROUP_ROOT).join("cpu").join(name);
        for dir in [&memory, &cpu] {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "cannot create cgroup {} (needs root and cgroup v1 memory and cpu): {e}",
                    dir.display()
                )
            })?;
        }
        let cgroup = Cgroup {
            memory,
            cpu,
            limits,
        };
        cgroup.write(&cgroup.memory, "memory.limit_in_bytes", limits.memory_bytes)?;
        cgroup.write(&cgroup.cpu, "cpu.cfs_period_us", CFS_PERIOD_US)?;
        let quota = (limits.cpu_cores * CFS_PERIOD_US as f64).round() as u64;
        cgroup.write(&cgroup.cpu, "cpu.cfs_quota_us", quota)?;
        Ok(cgroup)
    }

    fn write(&self, dir: &Path, file: &str, value: u64) -> Result<(), String> {
        std::fs::write(dir.join(file), value.to_string())
            .map_err(|e| format!("cannot set {}: {e}", dir.join(file).display()))
    }

    /// `program args...` started inside the cgroup: a shell joins it, then becomes the program,
    /// so nothing of the program runs outside the limits.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("sh");
        // `sh -c SCRIPT a b c...` puts `a` in $0 and the rest in $1...: one shift drops the cpu
        // cgroup and leaves the program first in "$@" (`shift 2` also dropped the program, and
        // the shell tried to exec its first argument).
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
            .arg(&self.memory)
            .arg(&self.cpu)
            .arg(program.as_ref());
        command
    }

    pub fn stats(&self) -> CgroupStats {
        let read =
            |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let number = |text: String| text.trim().parse::<u64>().unwrap_or(0);
        let cpu_stat = read(&self.cpu, "cpu.stat");
        CgroupStats {
            max_usage_bytes: number(read(&self.memory, "memory.max_usage_in_bytes")),
            failcnt: number(read(&self.memory, "memory.failcnt")),
            oom_kills: field(&read(&self.memory, "memory.oom_control"), "oom_kill "),
            periods: field(&cpu_stat, "nr_periods "),
            throttled_periods: field(&cpu_stat, "nr_throttled "),
            throttled_seconds: field(&cpu_stat, "throttled_time ") as f64 / 1e9,
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A cgroup with processes left cannot be removed; it is harmless and small.
        let _ = std::fs::remove_dir(&self.memory);
        let _ = std::fs::remove_dir(&self.cpu);
    }
}
