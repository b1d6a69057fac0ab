//! What a message looks like on the wire: Slack's incoming-webhook JSON, nodedrain's own JSON,
//! or the operator's minijinja template over the same fields.

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use super::coalesce::{MAX_NAMED, Message};
use super::{NotifyError, NotifyEvent, NotifyFormat};

const TEMPLATE: &str = "body";

/// The fields a template sees (and the generic JSON body): [`Message`]'s, plus the sentence a
/// person reads and the sender's name.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    source: &'static str,
    text: String,
    #[serde(flatten)]
    message: &'a Message,
}

/// Turns messages into request bodies. Built once at start, so a broken template stops the
/// controller there rather than failing every notification later.
#[derive(Debug)]
pub struct Renderer {
    format: NotifyFormat,
    template: Option<Environment<'static>>,
}

impl Renderer {
    /// `template` is minijinja source rendering the whole JSON body; only with the JSON format.
    pub fn new(format: NotifyFormat, template: Option<String>) -> Result<Renderer, NotifyError> {
        let template = match template {
            None => None,
            Some(_) if format == NotifyFormat::Slack => {
                return Err(NotifyError::TemplateNeedsJson);
            }
            Some(source) => {
                let mut env = Environment::new();
                // A misspelt field must fail here, at start, not render as empty text in the
                // middle of a burst.
                env.set_undefined_behavior(UndefinedBehavior::Strict);
                env.add_template_owned(TEMPLATE, source)
                    .map_err(|e| NotifyError::Template(e.to_string()))?;
                Some(env)
            }
        };
        let renderer = Renderer { format, template };
        // Every field is filled in the sample, so a template that renders it renders any message.
        let sample = renderer
            .render(&sample())
            .map_err(|e| NotifyError::Template(e.to_string()))?;
        if renderer.template.is_some() {
            serde_json::from_str::<serde_json::Value>(&sample).map_err(|e| {
                NotifyError::Template(format!(
                    "does not render JSON ({e}); quote strings with the tojson filter, e.g. {{{{ text|tojson }}}}. It rendered: {sample}"
                ))
            })?;
        }
        Ok(renderer)
    }

    pub fn render(&self, message: &Message) -> Result<String, minijinja::Error> {
        let body = Body {
            source: "nodedrain",
            text: text(message),
            message,
        };
        if let Some(env) = &self.template {
            return env.get_template(TEMPLATE)?.render(Serde(&body));
        }
        Ok(match self.format {
            NotifyFormat::Slack => serde_json::json!({ "text": body.text }).to_string(),
            NotifyFormat::Json => serde_json::to_string(&body).unwrap_or_default(),
        })
    }
}

fn sample() -> Message {
    Message {
        event: NotifyEvent::Received,
        kind: "spot-interruption",
        count: 1,
        nodes: vec!["ip-10-0-0-1.ec2.internal".into()],
        details: vec!["default/web-0".into()],
        more_details: 0,
        event_id: Some("00000000-0000-0000-0000-000000000000".into()),
        deadline: Some(jiff::Timestamp::UNIX_EPOCH),
    }
}

/// `a, b, c and 7 more`, naming at most [`MAX_NAMED`].
fn list(names: &[String], more: usize) -> String {
    let shown = names.len().min(MAX_NAMED);
    let more = more + names.len() - shown;
    let mut out = names[..shown].join(", ");
    if more > 0 {
        out.push_str(&format!(" and {more} more"));
    }
    out
}

/// The sentence a person reads: one node by name, a burst by its count.
pub fn text(m: &Message) -> String {
    let nodes = m.nodes.len();
    let names = list(&m.nodes, 0);
    let kind = m.kind;
    let details = list(&m.details, m.more_details);
    let mut text = match (m.event, nodes) {
        (NotifyEvent::Received, 1) => format!("Node {names} cordoned for {kind}"),
        (NotifyEvent::Received, n) => format!("{n} nodes cordoned for {kind}: {names}"),
        (NotifyEvent::Started, 1) => format!("Draining node {names} ({kind})"),
        (NotifyEvent::Started, n) => format!("Draining {n} nodes ({kind}): {names}"),
        (NotifyEvent::Succeeded, 1) => format!("Node {names} drained ({kind})"),
        (NotifyEvent::Succeeded, n) => format!("{n} nodes drained ({kind}): {names}"),
        (NotifyEvent::Failed, 1) => format!("Drain of node {names} failed ({kind})"),
        (NotifyEvent::Failed, n) => format!("Drains of {n} nodes failed ({kind}): {names}"),
        (NotifyEvent::DeadlineOverride, 1) => format!(
            "Deadline reached on node {names} ({kind}): {} deleted although a PodDisruptionBudget blocked {}",
            pods(m.count),
            if m.count == 1 { "it" } else { "them" }
        ),
        (NotifyEvent::DeadlineOverride, n) => format!(
            "Deadline reached on {n} nodes ({kind}): {} deleted although a PodDisruptionBudget blocked them: {names}",
            pods(m.count)
        ),
    };
    if let (NotifyEvent::Received, Some(deadline)) = (m.event, m.deadline) {
        text.push_str(&format!(
            "; {} {deadline:.0}",
            if nodes == 1 {
                "deadline"
            } else {
                "first deadline"
            }
        ));
    }
    if !details.is_empty() {
        text.push_str(&format!(" ({details})"));
    }
    text
}

fn pods(count: usize) -> String {
    if count == 1 {
        "1 pod".into()
    } else {
        format!("{count} pods")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(event: NotifyEvent, nodes: usize) -> Message {
        Message {
            event,
            kind: "spot-interruption",
            count: nodes,
            nodes: (0..nodes).map(|i| format!("n{i:02}")).collect(),
            details: vec![],
            more_details: 0,
            event_id: (nodes == 1).then(|| "ev-1".to_string()),
            deadline: None,
        }
    }

    #[test]
    fn one_node_is_named_and_a_burst_is_counted() {
        assert_eq!(
            text(&message(NotifyEvent::Received, 1)),
            "Node n00 cordoned for spot-interruption"
        );
        assert_eq!(
            text(&message(NotifyEvent::Received, 37)),
            "37 nodes cordoned for spot-interruption: n00, n01, n02, n03, n04, n05, n06, n07, n08, n09 and 27 more"
        );
        let mut failed = message(NotifyEvent::Failed, 1);
        failed.details =
            vec!["timed out: shop/checkout-0 (PDB checkout allows 0 disruptions)".into()];
        assert_eq!(
            text(&failed),
            "Drain of node n00 failed (spot-interruption) (timed out: shop/checkout-0 (PDB checkout allows 0 disruptions))"
        );
    }

    #[test]
    fn a_deadline_override_counts_pods() {
        let mut m = message(NotifyEvent::DeadlineOverride, 1);
        m.count = 3;
        m.details = vec!["a/p1".into(), "a/p2".into(), "b/p3".into()];
        assert_eq!(
            text(&m),
            "Deadline reached on node n00 (spot-interruption): 3 pods deleted although a PodDisruptionBudget blocked them (a/p1, a/p2, b/p3)"
        );
    }

    #[test]
    fn slack_gets_text_and_json_gets_every_field() {
        let m = message(NotifyEvent::Succeeded, 1);
        let slack = Renderer::new(NotifyFormat::Slack, None).unwrap();
        let body: serde_json::Value = serde_json::from_str(&slack.render(&m).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"text": "Node n00 drained (spot-interruption)"})
        );

        let json = Renderer::new(NotifyFormat::Json, None).unwrap();
        let body: serde_json::Value = serde_json::from_str(&json.render(&m).unwrap()).unwrap();
        assert_eq!(body["source"], "nodedrain");
        assert_eq!(body["event"], "succeeded");
        assert_eq!(body["kind"], "spot-interruption");
        assert_eq!(body["count"], 1);
        assert_eq!(body["nodes"], serde_json::json!(["n00"]));
        assert_eq!(body["eventId"], "ev-1");
        assert_eq!(body["text"], "Node n00 drained (spot-interruption)");
    }

    #[test]
    fn a_template_renders_the_body() {
        let template = r#"{"summary": {{ text|tojson }}, "nodes": {{ nodes|length }}, "event": "{{ event }}"}"#;
        let r = Renderer::new(NotifyFormat::Json, Some(template.into())).unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&r.render(&message(NotifyEvent::Started, 2)).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"summary": "Draining 2 nodes (spot-interruption): n00, n01", "nodes": 2, "event": "started"})
        );
    }

    /// The examples of docs/notifications.md, as written there.
    #[test]
    fn the_documented_templates_render_json() {
        let nth = r#"{"text": {{ ("[nodedrain][" ~ kind ~ "] " ~ text ~ (" - EventID: " ~ eventId if eventId else ""))|tojson }}}"#;
        let r = Renderer::new(NotifyFormat::Json, Some(nth.into())).unwrap();
        let one: serde_json::Value =
            serde_json::from_str(&r.render(&message(NotifyEvent::Received, 1)).unwrap()).unwrap();
        assert_eq!(
            one,
            serde_json::json!({"text": "[nodedrain][spot-interruption] Node n00 cordoned for spot-interruption - EventID: ev-1"})
        );
        let many: serde_json::Value =
            serde_json::from_str(&r.render(&message(NotifyEvent::Received, 2)).unwrap()).unwrap();
        assert_eq!(
            many,
            serde_json::json!({"text": "[nodedrain][spot-interruption] 2 nodes cordoned for spot-interruption: n00, n01"})
        );

        let pager = r#"{"summary": {{ text|tojson }}, "severity": "{{ 'warning' if event in ['failed', 'deadline-override'] else 'info' }}",
 "custom_details": {"nodes": {{ nodes|tojson }}, "kind": {{ kind|tojson }}}}"#;
        let r = Renderer::new(NotifyFormat::Json, Some(pager.into())).unwrap();
        let body: serde_json::Value =
            serde_json::from_str(&r.render(&message(NotifyEvent::Failed, 1)).unwrap()).unwrap();
        assert_eq!(body["severity"], "warning");
        assert_eq!(body["custom_details"]["nodes"], serde_json::json!(["n00"]));
        let body: serde_json::Value =
            serde_json::from_str(&r.render(&message(NotifyEvent::Started, 1)).unwrap()).unwrap();
        assert_eq!(body["severity"], "info");

        // What the docs warn about: a misspelt field through a filter is not caught.
        let r = Renderer::new(
            NotifyFormat::Json,
            Some(r#"{"t": {{ txt|tojson }}}"#.into()),
        )
        .unwrap();
        assert_eq!(
            r.render(&message(NotifyEvent::Started, 1)).unwrap(),
            r#"{"t": null}"#
        );
    }

    #[test]
    fn a_template_that_cannot_work_is_refused_at_start() {
        let err = |t: &str| {
            Renderer::new(NotifyFormat::Json, Some(t.into()))
                .unwrap_err()
                .to_string()
        };
        // A misspelt field.
        assert!(err(r#"{"t": "{{ txt }}"}"#).contains("undefined"));
        // A string left unquoted: not JSON.
        assert!(err(r#"{"t": {{ text }}}"#).contains("tojson"));
        // Syntax.
        assert!(err(r#"{"t": {{ text "#).contains("template"));
        assert!(matches!(
            Renderer::new(NotifyFormat::Slack, Some("{}".into())),
            Err(NotifyError::TemplateNeedsJson)
        ));
    }
}
