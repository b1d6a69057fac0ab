//! How long a container's preStop hook keeps it serving, read from the spec where that is
//! possible: `sleep.seconds`, or an exec hook that is `sleep N` (directly, through a shell, or
//! through busybox). Anything else is reported as unknown rather than guessed.

use k8s_openapi::api::core::v1::{Container, LifecycleHandler};

/// The hook's duration, as far as the spec tells.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PreStop {
    /// No preStop hook.
    Missing,
    /// Exactly this many seconds (a sleep and nothing else).
    Known(f64),
    /// At least this many seconds: the script sleeps that long and also runs `other`, whose
    /// duration is unknown.
    AtLeast { seconds: f64, other: String },
    /// Cannot be read: the description says what the hook is.
    Unknown(String),
}

/// The readiness probe's failure window: `periodSeconds × failureThreshold` with the API
/// defaults (10 s × 3), in seconds; `None` without a readiness probe.
pub(crate) fn readiness_window(container: &Container) -> Option<(i64, i64)> {
    let probe = container.readiness_probe.as_ref()?;
    let period = i64::from(probe.period_seconds.unwrap_or(10).max(1));
    let threshold = i64::from(probe.failure_threshold.unwrap_or(3).max(1));
    Some((period, threshold))
}

pub(crate) fn prestop_of(container: &Container) -> PreStop {
    match container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
    {
        None => PreStop::Missing,
        Some(handler) => of_handler(handler),
    }
}

fn of_handler(handler: &LifecycleHandler) -> PreStop {
    if let Some(sleep) = &handler.sleep {
        return PreStop::Known(sleep.seconds.max(0) as f64);
    }
    if let Some(exec) = &handler.exec {
        let command = exec.command.clone().unwrap_or_default();
        return of_command(&command);
    }
    if let Some(http) = &handler.http_get {
        return PreStop::Unknown(format!(
            "an httpGet hook ({})",
            http.path.as_deref().unwrap_or("/")
        ));
    }
    if handler.tcp_socket.is_some() {
        return PreStop::Unknown("a tcpSocket hook".to_string());
    }
    PreStop::Unknown("an empty hook".to_string())
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

const SHELLS: [&str; 6] = ["sh", "bash", "ash", "dash", "zsh", "ksh"];

fn of_command(command: &[String]) -> PreStop {
    let described = || format!("exec {:?}", command.join(" "));
    let Some(first) = command.first() else {
        return PreStop::Unknown("an exec hook without a command".to_string());
    };
    let program = basename(first);
    let args = &command[1..];
    // busybox runs its applets by name: `busybox sleep 5`, `busybox sh -c '...'`.
    if program == "busybox" {
        return match of_command(args) {
            PreStop::Unknown(_) => PreStop::Unknown(described()),
            known => known,
        };
    }
    if program == "sleep" {
        return match sleep_seconds(args.iter().map(String::as_str)) {
            Some(seconds) => PreStop::Known(seconds),
            None => PreStop::Unknown(described()),
        };
    }
    if SHELLS.contains(&program) {
        // `sh -c SCRIPT` (options such as -e, -x, -ec may come first).
        let script = args
            .iter()
            .position(|a| a.starts_with('-') && !a.starts_with("--") && a.contains('c'))
            .and_then(|i| args.get(i + 1));
        if let Some(script) = script {
            return of_script(script);
        }
    }
    PreStop::Unknown(described())
}

/// GNU sleep adds up its arguments; each is a number with an optional s/m/h/d suffix.
fn sleep_seconds<'a>(args: impl Iterator<Item = &'a str>) -> Option<f64> {
    let mut total = 0.0;
    let mut any = false;
    for arg in args {
        let (number, unit) = match arg.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&arg[..i], c),
            _ => (arg, 's'),
        };
        let multiplier = match unit {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            'd' => 86400.0,
            _ => return None,
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        total += value * multiplier;
        any = true;
    }
    any.then_some(total)
}

/// Commands that take no noticeable time.
fn is_instant(words: &[&str]) -> bool {
    matches!(
        words.first().map(|w| basename(w)),
        Some("true" | ":" | "echo" | "exit" | "printf")
    )
}

fn of_script(script: &str) -> PreStop {
    let mut sleeps = 0.0;
    let mut any_sleep = false;
    let mut others = Vec::new();
    // Split into simple commands on ; && || & | and newlines; good enough for hooks, which are
    // one-liners like `sleep 15 && nginx -s quit`.
    for command in script.split([';', '&', '|', '\n']) {
        let words: Vec<&str> = command.split_whitespace().collect();
        if words.is_empty() || is_instant(&words) {
            continue;
        }
        if basename(words[0]) == "sleep"
            && let Some(seconds) = sleep_seconds(words[1..].iter().copied())
        {
            sleeps += seconds;
            any_sleep = true;
            continue;
        }
        others.push(words.join(" "));
    }
    match (any_sleep, others.is_empty()) {
        (true, true) => PreStop::Known(sleeps),
        (true, false) => PreStop::AtLeast {
            seconds: sleeps,
            other: others.join("; "),
        },
        (false, _) => PreStop::Unknown(format!("exec script {script:?}")),
    }
}

/// Seconds for messages: `20 s`, `2.5 s`.
pub(crate) fn seconds(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0} s")
    } else {
        format!("{value} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(lifecycle: serde_json::Value) -> Container {
        serde_json::from_value(json!({"name": "c", "lifecycle": {"preStop": lifecycle}})).unwrap()
    }

    fn exec(command: &[&str]) -> PreStop {
        prestop_of(&container(json!({"exec": {"command": command}})))
    }

    #[test]
    fn sleep_action_and_missing_hook() {
        assert_eq!(
            prestop_of(&container(json!({"sleep": {"seconds": 20}}))),
            PreStop::Known(20.0)
        );
        let bare: Container = serde_json::from_value(json!({"name": "c"})).unwrap();
        assert_eq!(prestop_of(&bare), PreStop::Missing);
        let post_start_only: Container = serde_json::from_value(
            json!({"name": "c", "lifecycle": {"postStart": {"exec": {"command": ["true"]}}}}),
        )
        .unwrap();
        assert_eq!(prestop_of(&post_start_only), PreStop::Missing);
    }

    #[test]
    fn exec_sleeps_are_read() {
        assert_eq!(exec(&["sleep", "15"]), PreStop::Known(15.0));
        assert_eq!(exec(&["/bin/sleep", "1m"]), PreStop::Known(60.0));
        assert_eq!(exec(&["sleep", "1m", "30s"]), PreStop::Known(90.0));
        assert_eq!(exec(&["sleep", "2.5"]), PreStop::Known(2.5));
        assert_eq!(exec(&["busybox", "sleep", "7"]), PreStop::Known(7.0));
        assert_eq!(exec(&["/bin/sh", "-c", "sleep 10"]), PreStop::Known(10.0));
        assert_eq!(
            exec(&["sh", "-ec", "sleep 5; sleep 5"]),
            PreStop::Known(10.0)
        );
        assert_eq!(
            exec(&["bash", "-c", "echo draining && sleep 30"]),
            PreStop::Known(30.0)
        );
        assert_eq!(
            exec(&["sh", "-c", "sleep 5 && nginx -s quit"]),
            PreStop::AtLeast {
                seconds: 5.0,
                other: "nginx -s quit".to_string()
            }
        );
    }

    #[test]
    fn what_cannot_be_read_is_unknown() {
        for command in [
            &["sleep", "$DELAY"][..],
            &["sleep", "infinity"],
            &["sleep"],
            &["nginx", "-s", "quit"],
            &["sh", "-c", "nginx -s quit"],
            &["sh", "script.sh"],
            &[],
        ] {
            assert!(
                matches!(exec(command), PreStop::Unknown(_)),
                "{command:?} gave {:?}",
                exec(command)
            );
        }
        assert!(matches!(
            prestop_of(&container(json!({"httpGet": {"path": "/drain", "port": 8080}}))),
            PreStop::Unknown(d) if d.contains("/drain")
        ));
    }

    #[test]
    fn readiness_window_uses_api_defaults() {
        let with_probe = |probe: serde_json::Value| -> Container {
            serde_json::from_value(json!({"name": "c", "readinessProbe": probe})).unwrap()
        };
        assert_eq!(
            readiness_window(&with_probe(
                json!({"periodSeconds": 5, "failureThreshold": 3})
            )),
            Some((5, 3))
        );
        assert_eq!(readiness_window(&with_probe(json!({}))), Some((10, 3)));
        let none: Container = serde_json::from_value(json!({"name": "c"})).unwrap();
        assert_eq!(readiness_window(&none), None);
    }

    #[test]
    fn seconds_print_without_needless_decimals() {
        assert_eq!(seconds(20.0), "20 s");
        assert_eq!(seconds(2.5), "2.5 s");
    }
}
