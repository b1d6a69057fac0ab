//! `--notify-*` flags and their validation.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{NotifyError, NotifyEvent, NotifyFormat, Renderer};
use crate::config::parse_duration;

/// Longer than this and a hanging webhook holds the poster (and so every later message) for
/// longer than a spot warning lasts.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Notifications")]
pub struct NotifyArgs {
    /// Webhook to post drain notifications to (a Slack incoming webhook, or any endpoint taking
    /// JSON). It is a credential: pass it through the environment from a Secret. Unset: no
    /// notifications.
    #[arg(long, env = "NODEDRAIN_NOTIFY_URL", hide_env_values = true)]
    pub notify_url: Option<String>,
    /// Body format: `slack` ({"text": ...}) or `json` (nodedrain's fields, or the template).
    #[arg(long, env = "NODEDRAIN_NOTIFY_FORMAT", value_enum, default_value_t = NotifyFormat::Slack)]
    pub notify_format: NotifyFormat,
    /// A minijinja template rendering the JSON body from the fields of docs/notifications.md,
    /// e.g. {"msg": {{ text|tojson }}}; with --notify-format json.
    #[arg(long, env = "NODEDRAIN_NOTIFY_TEMPLATE", value_name = "FILE")]
    pub notify_template: Option<PathBuf>,
    /// HTTP(S) proxy for the webhook, e.g. http://proxy.internal:3128. Unset: HTTPS_PROXY /
    /// HTTP_PROXY / NO_PROXY from the environment apply.
    #[arg(long, env = "NODEDRAIN_NOTIFY_PROXY")]
    pub notify_proxy: Option<String>,
    /// Which drain events to notify about (comma-separated).
    #[arg(
        long,
        env = "NODEDRAIN_NOTIFY_EVENTS",
        value_enum,
        value_delimiter = ',',
        default_value = "received,started,deadline-override,succeeded,failed"
    )]
    pub notify_events: Vec<NotifyEvent>,
    /// Notices arriving within this long of the first are sent as one message per event and
    /// kind ("37 nodes cordoned for spot-interruption").
    #[arg(long, env = "NODEDRAIN_NOTIFY_COALESCE_WINDOW", default_value = "5s", value_parser = parse_duration)]
    pub notify_coalesce_window: Duration,
    /// At most this many posts a minute (after a burst of 5); beyond it, notices keep
    /// coalescing until a post is allowed.
    #[arg(long, env = "NODEDRAIN_NOTIFY_MAX_PER_MINUTE", default_value_t = 10)]
    pub notify_max_per_minute: u32,
    /// Give up on a post after this long (1s-1m); it is counted as a timeout, not retried.
    #[arg(long, env = "NODEDRAIN_NOTIFY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub notify_timeout: Duration,
}

/// Validated notification settings.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Never logged or shown: a Slack webhook URL is its own credential.
    pub url: reqwest::Url,
    pub format: NotifyFormat,
    /// Template source; already known to compile and render JSON.
    pub template: Option<String>,
    pub proxy: Option<reqwest::Url>,
    pub events: Vec<NotifyEvent>,
    pub coalesce_window: Duration,
    /// Invariant: at least 1.
    pub max_per_minute: u32,
    pub timeout: Duration,
}

fn http_url(text: &str) -> Option<reqwest::Url> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    matches!(url.scheme(), "http" | "https")
        .then_some(url)
        .filter(|u| u.host().is_some())
}

impl NotifyArgs {
    /// `None` when no URL is set (notifications off).
    pub fn validate(&self) -> Result<Option<NotifyConfig>, NotifyError> {
        let Some(url) = self.notify_url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let url = http_url(url).ok_or(NotifyError::InvalidUrl)?;
        let proxy = match self
            .notify_proxy
            .as_deref()
            .filter(|p| !p.trim().is_empty())
        {
            None => None,
            Some(p) => Some(http_url(p).ok_or_else(|| NotifyError::InvalidProxy(p.to_string()))?),
        };
        if self.notify_max_per_minute == 0 {
            return Err(NotifyError::InvalidRate);
        }
        if self.notify_timeout < Duration::from_secs(1) || self.notify_timeout > MAX_TIMEOUT {
            return Err(NotifyError::InvalidTimeout(self.notify_timeout));
        }
        let template =
            match &self.notify_template {
                None => None,
                Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                    NotifyError::ReadTemplate {
                        path: path.display().to_string(),
                        problem: source.to_string(),
                    }
                })?),
            };
        // Compiles and test-renders the template: a broken one stops the controller at start.
        Renderer::new(self.notify_format, template.clone())?;
        Ok(Some(NotifyConfig {
            url,
            format: self.notify_format,
            template,
            proxy,
            events: self.notify_events.clone(),
            coalesce_window: self.notify_coalesce_window,
            max_per_minute: self.notify_max_per_minute,
            timeout: self.notify_timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Test {
        #[command(flatten)]
        args: NotifyArgs,
    }

    fn args(extra: &[&str]) -> NotifyArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(extra);
        let mut args = Test::try_parse_from(argv).expect("parses").args;
        // Not from the developer's environment.
        if !extra.contains(&"--notify-url") {
            args.notify_url = None;
        }
        if !extra.contains(&"--notify-proxy") {
            args.notify_proxy = None;
        }
        if !extra.contains(&"--notify-template") {
            args.notify_template = None;
        }
        args
    }

    #[test]
    fn no_url_means_no_notifications() {
        assert!(args(&[]).validate().unwrap().is_none());
        assert!(args(&["--notify-url", " "]).validate().unwrap().is_none());
    }

    #[test]
    fn defaults() {
        let config = args(&["--notify-url", "https://hooks.slack.com/services/T/B/x"])
            .validate()
            .unwrap()
            .unwrap();
        assert_eq!(config.format, NotifyFormat::Slack);
        assert_eq!(config.events, NotifyEvent::ALL);
        assert_eq!(config.coalesce_window, Duration::from_secs(5));
        assert_eq!(config.max_per_minute, 10);
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.proxy, None);
    }

    #[test]
    fn a_bad_url_is_refused_without_showing_it() {
        for bad in [
            "hooks.slack.com/services/secret",
            "ftp://x/secret",
            "mailto:secret@example.com",
        ] {
            let err = args(&["--notify-url", bad]).validate().unwrap_err();
            assert!(matches!(err, NotifyError::InvalidUrl), "{bad}: {err}");
            assert!(!err.to_string().contains("secret"));
        }
    }

    #[test]
    fn settings_are_checked() {
        let url = ["--notify-url", "http://127.0.0.1:9/hook"];
        let with = |extra: &[&str]| {
            let mut all = url.to_vec();
            all.extend_from_slice(extra);
            args(&all).validate()
        };
        assert!(matches!(
            with(&["--notify-proxy", "proxy:3128"]),
            Err(NotifyError::InvalidProxy(_))
        ));
        assert_eq!(
            with(&["--notify-proxy", "http://proxy:3128"])
                .unwrap()
                .unwrap()
                .proxy
                .unwrap()
                .as_str(),
            "http://proxy:3128/"
        );
        assert!(matches!(
            with(&["--notify-max-per-minute", "0"]),
            Err(NotifyError::InvalidRate)
        ));
        assert!(matches!(
            with(&["--notify-timeout", "5m"]),
            Err(NotifyError::InvalidTimeout(_))
        ));
        assert!(matches!(
            with(&[
                "--notify-template",
                "/nonexistent/template.j2",
                "--notify-format",
                "json"
            ]),
            Err(NotifyError::ReadTemplate { .. })
        ));
        let events = with(&["--notify-events", "failed,deadline-override"])
            .unwrap()
            .unwrap()
            .events;
        assert_eq!(events, [NotifyEvent::Failed, NotifyEvent::DeadlineOverride]);
    }
}
