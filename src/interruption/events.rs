//! Turns one SQS message body into the interruptions it announces.
//!
//! Pure on purpose: the intake loop must decide "drain, delete, or dead-letter" for every message,
//! and the only way to trust that decision under a burst of 50 interruptions is to test it
//! exhaustively without AWS. Nothing here reads a clock or does I/O; the deadline of each
//! interruption is derived from times carried in the message itself, and the receive time comes
//! in as a parameter for when the message's own time is unusable.
//!
//! Fail open: dead-lettering a message means no drain at all, so only what names the instances
//! (and, for Auto Scaling hooks, what completes the hook) is required. An optional time that is
//! missing, empty or garbled falls back (see [`Fallback`]) instead of rejecting the message; the
//! rule is written out for operators in docs/events.md.
//!
//! Accepted shapes (the queue may be fed by EventBridge rules, by Auto Scaling lifecycle hooks
//! pointing straight at the queue, or by either of those through an SNS topic):
//! - EventBridge envelopes (`detail-type` + `detail`) for spot warnings, rebalance
//!   recommendations, instance state changes, AWS Health scheduled changes, Auto Scaling
//!   terminate lifecycle actions and capacity reservation interruption warnings;
//! - Auto Scaling's own lifecycle notification (`LifecycleTransition`, `RequestId`, ...) and its
//!   `autoscaling:TEST_NOTIFICATION`;
//! - any of the above as the `Message` string of an SNS `Notification`, unwrapped once.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use jiff::fmt::rfc2822;
use jiff::{SignedDuration, Timestamp};
use serde_json::{Map, Value};

use crate::metrics::LabelValue;

/// EventBridge `detail-type` values this module understands. Public so that whoever writes the
/// EventBridge rules (Helm chart, docs, sandbox) matches exactly what the parser accepts.
pub mod detail_type {
    /// EC2 spot interruption notice; the instance is reclaimed two minutes after `time`.
    pub const SPOT_INTERRUPTION: &str = "EC2 Spot Instance Interruption Warning";
    /// EC2 hint that a spot instance is at elevated risk; nothing is scheduled yet.
    pub const REBALANCE_RECOMMENDATION: &str = "EC2 Instance Rebalance Recommendation";
    /// Every EC2 instance state transition, including the harmless ones.
    pub const STATE_CHANGE: &str = "EC2 Instance State-change Notification";
    /// AWS Health; only EC2 `scheduledChange` events concern nodes.
    pub const HEALTH: &str = "AWS Health Event";
    /// Auto Scaling terminate lifecycle hook delivered through EventBridge.
    pub const ASG_TERMINATE: &str = "EC2 Instance-terminate Lifecycle Action";
    /// Auto Scaling launch lifecycle hook; a rule matching all of `aws.autoscaling` delivers it
    /// too, and it must be deleted rather than dead-lettered.
    pub const ASG_LAUNCH: &str = "EC2 Instance-launch Lifecycle Action";
    /// Interruptible capacity reservation reclaiming an instance, two minutes' notice.
    pub const CAPACITY_RESERVATION_INTERRUPTION: &str =
        "EC2 Capacity Reservation Instance Interruption Warning";
}

/// How long before termination AWS sends spot and capacity-reservation warnings. AWS documents
/// "two minutes" for both and the events carry only the send time, so the deadline is derived.
pub const TWO_MINUTE_WARNING: SignedDuration = SignedDuration::from_secs(120);

/// The spot `instance-action` whose interruption starts at once: AWS documents that hibernation
/// begins immediately after the warning, so there are no two minutes to count on.
const SPOT_ACTION_HIBERNATE: &str = "hibernate";

const LIFECYCLE_TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";
const LIFECYCLE_LAUNCHING: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
const ASG_TEST_NOTIFICATION: &str = "autoscaling:TEST_NOTIFICATION";

/// Longest slice of an input value quoted in errors, ignore reasons and `detail` texts: these end
/// up in logs and Kubernetes Events, and a hostile or broken message must not flood either.
const MAX_QUOTED_CHARS: usize = 64;

/// Why a node is being drained. The variant decides the deadline policy downstream (only
/// [`InterruptionKind::RebalanceRecommendation`] is voluntary) and its [`as_str`] form is used
/// both as a metric label value and as the value of the `nodedrain.io/interruption` taint.
///
/// [`as_str`]: InterruptionKind::as_str
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InterruptionKind {
    SpotInterruption,
    RebalanceRecommendation,
    StateChange,
    ScheduledChange,
    AsgTermination,
    CapacityReservationInterruption,
}

impl InterruptionKind {
    /// Every kind, so metrics can pre-register each label value and show zeros.
    pub const ALL: &'static [InterruptionKind] = &[
        InterruptionKind::SpotInterruption,
        InterruptionKind::RebalanceRecommendation,
        InterruptionKind::StateChange,
        InterruptionKind::ScheduledChange,
        InterruptionKind::AsgTermination,
        InterruptionKind::CapacityReservationInterruption,
    ];

    /// Stable kebab-case name. Invariant: a valid Kubernetes label value (≤ 63 chars,
    /// alphanumeric at both ends), because it is a taint value and a metric label; changing one
    /// breaks dashboards and tolerations that users wrote against it.
    pub const fn as_str(self) -> &'static str {
        match self {
            InterruptionKind::SpotInterruption => "spot-interruption",
            InterruptionKind::RebalanceRecommendation => "rebalance-recommendation",
            InterruptionKind::StateChange => "state-change",
            InterruptionKind::ScheduledChange => "scheduled-change",
            InterruptionKind::AsgTermination => "asg-termination",
            InterruptionKind::CapacityReservationInterruption => {
                "capacity-reservation-interruption"
            }
        }
    }

    /// Whether the instance may survive: only then are PDBs never overridden. A rebalance
    /// recommendation schedules nothing; every other kind ends with the instance gone.
    pub const fn is_voluntary(self) -> bool {
        matches!(self, InterruptionKind::RebalanceRecommendation)
    }
}

impl fmt::Display for InterruptionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind was not one of [`InterruptionKind::as_str`]'s values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown interruption kind {0:?}")]
pub struct UnknownKind(pub String);

impl FromStr for InterruptionKind {
    type Err = UnknownKind;

    /// Inverse of [`InterruptionKind::as_str`], so a new leader can read the kind back from a
    /// node's taint or drain record.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        InterruptionKind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind(quote(s)))
    }
}

/// What `CompleteLifecycleAction` and `RecordLifecycleActionHeartbeat` need. Kept verbatim from
/// the message because Auto Scaling holds the instance until the hook is completed or times out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleAction {
    pub hook_name: String,
    pub group_name: String,
    /// Absent in some hand-crafted or replayed messages; the APIs accept the instance id instead.
    pub token: Option<String>,
    /// Same value as [`Interruption::instance_id`]; repeated so the struct alone is a complete
    /// API argument set.
    pub instance_id: String,
}

/// One instance that must be drained, as announced by one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interruption {
    pub kind: InterruptionKind,
    /// Invariant: `i-` followed by 8 or 17 lowercase hex digits.
    pub instance_id: String,
    /// The EventBridge event `id`, or `RequestId` for direct Auto Scaling notifications; the inner
    /// id when SNS-wrapped, so redeliveries through either path dedupe. Not unique per
    /// interruption: a Health event names several instances under one id, so dedupe on
    /// `(event_id, instance_id)`.
    pub event_id: String,
    /// When AWS emitted the event; the start of event-to-cordon latency. The receive time when
    /// the message's own is unusable (see [`Interruption::fallbacks`]).
    pub event_time: Timestamp,
    /// When the instance is expected to be gone. `None` means AWS promised no time: rebalance
    /// recommendations, ASG hooks (the hook timeout is configuration), Health events without
    /// a usable `startTime`. May already be in the past (state changes, late delivery).
    pub deadline: Option<Timestamp>,
    /// Present exactly for [`InterruptionKind::AsgTermination`].
    pub lifecycle: Option<LifecycleAction>,
    /// Short human text for Events, logs and the drain record's reason ("state stopping", a
    /// Health `eventTypeCode`), followed by each of [`Interruption::fallbacks`]. Never parse it;
    /// input-derived parts are truncated.
    pub detail: String,
    /// Optional fields the message carried in an unusable form, and what was used instead.
    /// Empty for a well-formed message.
    pub fallbacks: Vec<Fallback>,
}

/// An optional field that was missing, empty or garbled, and what the parser used instead of
/// rejecting the whole message. The intake logs each one as a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// Path of the field in the message, as in [`ParseError`] texts (`time`,
    /// `detail.startTime`).
    pub field: &'static str,
    /// What the field held: the value quoted and truncated, `missing`, or its JSON type.
    pub found: String,
    /// What took its place.
    pub instead: Instead,
}

/// What replaces an unusable field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instead {
    /// The event time is the moment nodedrain received the message, and every deadline derived
    /// from the event time counts from then.
    ReceiveTime,
    /// No deadline: the drain runs like one whose event names no start time.
    NoDeadline,
    /// The deadline is two minutes after the event time, as for a warning that states none.
    TwoMinuteWarning,
}

impl Fallback {
    fn new(field: &'static str, value: Option<&Value>, instead: Instead) -> Fallback {
        let found = match value {
            None => "missing".to_owned(),
            Some(Value::String(s)) => format!("{:?}", quote(s)),
            Some(other) => json_type(other).to_owned(),
        };
        Fallback {
            field,
            found,
            instead,
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let instead = match self.instead {
            Instead::ReceiveTime => "used the receive time",
            Instead::NoDeadline => "no deadline",
            Instead::TwoMinuteWarning => "deadline two minutes after the event time",
        };
        write!(f, "`{}` unusable ({}): {instead}", self.field, self.found)
    }
}

/// The outcome of parsing one message body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Invariant: never empty.
    Interruptions(Vec<Interruption>),
    /// A well-formed message that needs no action: delete it, do not dead-letter it.
    Ignore { reason: IgnoreReason },
}

/// Why a well-formed message needs no drain. Kept typed (not a string) so the intake can count
/// ignores by [`IgnoreReason::as_label`] and log the specifics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoreReason {
    /// Auto Scaling sends this once when a notification target is attached; no instance.
    AsgTestNotification,
    /// A launch lifecycle hook; completing it is not nodedrain's job.
    AsgLaunching,
    /// A state change to a state that does not take the instance away (`pending`, `running`).
    InstanceState { state: String },
    /// A Health event about a service other than EC2.
    HealthOtherService { service: String },
    /// An EC2 Health event that is not a `scheduledChange` (an `issue`, an account notice).
    HealthOtherCategory { category: String },
    /// A Health event whose `statusCode` is `closed`: the maintenance is over, and draining
    /// now would take down a node that has just survived it.
    HealthClosed,
    /// An EC2 scheduled change whose affected entities include no instance (volumes, hosts).
    HealthNoInstances,
    /// SNS subscription housekeeping (`SubscriptionConfirmation`, `UnsubscribeConfirmation`).
    SnsControl { message_type: String },
}

impl LabelValue for InterruptionKind {
    fn label_value(&self) -> &'static str {
        self.as_str()
    }
}

impl LabelValue for IgnoreReason {
    fn label_value(&self) -> &'static str {
        self.as_label()
    }
}

impl IgnoreReason {
    /// Bounded metric label value, one per variant.
    pub const fn as_label(&self) -> &'static str {
        match self {
            IgnoreReason::AsgTestNotification => "asg_test_notification",
            IgnoreReason::AsgLaunching => "asg_launching",
            IgnoreReason::InstanceState { .. } => "instance_state",
            IgnoreReason::HealthOtherService { .. } => "health_other_service",
            IgnoreReason::HealthOtherCategory { .. } => "health_other_category",
            IgnoreReason::HealthClosed => "health_closed",
            IgnoreReason::HealthNoInstances => "health_no_instances",
            IgnoreReason::SnsControl { .. } => "sns_control",
        }
    }
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::AsgTestNotification => f.write_str("Auto Scaling test notification"),
            IgnoreReason::AsgLaunching => f.write_str("Auto Scaling launch lifecycle action"),
            IgnoreReason::InstanceState { state } => {
                write!(f, "instance state {state:?} does not end the instance")
            }
            IgnoreReason::HealthOtherService { service } => {
                write!(f, "Health event for service {service:?}, not EC2")
            }
            IgnoreReason::HealthOtherCategory { category } => {
                write!(f, "Health event category {category:?}, not scheduledChange")
            }
            IgnoreReason::HealthClosed => f.write_str("Health event is closed"),
            IgnoreReason::HealthNoInstances => {
                f.write_str("Health event names no EC2 instance among its affected entities")
            }
            IgnoreReason::SnsControl { message_type } => {
                write!(f, "SNS {message_type} message")
            }
        }
    }
}

/// A message that cannot be turned into interruptions. Every variant names the field and what
/// was wrong, because the operator reading a dead-letter queue has only this text to go on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// `what` is "message body" or "SNS Message". The serde error is rendered into the text and
    /// not chained as a source, so `{:#}` does not print it twice.
    #[error("{what} is not valid JSON: {error}")]
    MalformedJson {
        what: &'static str,
        error: serde_json::Error,
    },
    #[error("missing required field `{field}`")]
    MissingField { field: &'static str },
    /// Wrong JSON type, or an empty string where a value is required.
    #[error("field `{field}` {problem}")]
    InvalidField {
        field: &'static str,
        problem: String,
    },
    #[error(
        "field `{field}` is not an EC2 instance id (`i-` and 8 or 17 lowercase hex digits): {value:?}"
    )]
    InvalidInstanceId { field: &'static str, value: String },
    /// Well-formed, but a type of event nodedrain does not handle; whether that deserves the
    /// dead-letter queue is the caller's policy. For non-EventBridge messages `detail_type`
    /// holds the Auto Scaling `Event`/`LifecycleTransition` or `SNS <Type>`.
    #[error("unsupported event type {detail_type:?}")]
    UnknownEvent { detail_type: String },
    /// Valid JSON of none of the accepted shapes.
    #[error(
        "message is neither an EventBridge event, an Auto Scaling notification nor an SNS notification"
    )]
    UnrecognizedMessage,
}

impl LabelValue for ParseError {
    fn label_value(&self) -> &'static str {
        self.as_label()
    }
}

impl ParseError {
    /// Bounded metric label value, one per variant.
    pub const fn as_label(&self) -> &'static str {
        match self {
            ParseError::MalformedJson { .. } => "malformed_json",
            ParseError::MissingField { .. } => "missing_field",
            ParseError::InvalidField { .. } => "invalid_field",
            ParseError::InvalidInstanceId { .. } => "invalid_instance_id",
            ParseError::UnknownEvent { .. } => "unknown_event",
            ParseError::UnrecognizedMessage => "unrecognized_message",
        }
    }
}

/// Parses one SQS message body received at `received`. Total: any input yields a value or a
/// typed error, never a panic, because one poisoned message must not stop the intake for every
/// other node.
pub fn parse_message(body: &str, received: Timestamp) -> Result<Parsed, ParseError> {
    let value: Value = serde_json::from_str(body).map_err(|error| ParseError::MalformedJson {
        what: "message body",
        error,
    })?;
    let obj = value.as_object().ok_or(ParseError::UnrecognizedMessage)?;
    if is_sns(obj) {
        parse_sns(obj, received)
    } else {
        parse_unwrapped(obj, received)
    }
}

/// Extracts the EC2 instance id from a Node's `spec.providerID`.
///
/// Lenient about what sits between `aws://` and the last segment (`aws:///us-east-1a/i-…`,
/// `aws:///i-…`, `aws://us-east-1a/i-…` are all seen in the wild), strict about the id itself,
/// so a Fargate or non-AWS provider id never resolves to an instance by accident.
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    is_instance_id(id).then_some(id)
}

/// `i-` followed by 8 (pre-2016) or 17 lowercase hex digits. Lowercase only: AWS never emits
/// upper case, and a case-folded id would not match the Node's providerID anyway.
fn is_instance_id(s: &str) -> bool {
    s.strip_prefix("i-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

// ---------------------------------------------------------------------------------------------
// Shapes

type Object = Map<String, Value>;

/// SNS envelopes are the only accepted shape with both `Type` and `TopicArn`.
fn is_sns(obj: &Object) -> bool {
    obj.get("Type").is_some_and(Value::is_string) && obj.contains_key("TopicArn")
}

fn parse_sns(obj: &Object, received: Timestamp) -> Result<Parsed, ParseError> {
    let message_type = req_str(obj, "Type", "Type")?;
    match message_type {
        "Notification" => {
            let message = req_str(obj, "Message", "Message")?;
            let inner: Value =
                serde_json::from_str(message).map_err(|error| ParseError::MalformedJson {
                    what: "SNS Message",
                    error,
                })?;
            // Unwrapped once only: an SNS envelope inside another is not a shape AWS produces.
            let inner = inner.as_object().ok_or(ParseError::UnrecognizedMessage)?;
            parse_unwrapped(inner, received)
        }
        "SubscriptionConfirmation" | "UnsubscribeConfirmation" => Ok(Parsed::Ignore {
            reason: IgnoreReason::SnsControl {
                message_type: message_type.to_owned(),
            },
        }),
        other => Err(ParseError::UnknownEvent {
            detail_type: format!("SNS {}", quote(other)),
        }),
    }
}

fn parse_unwrapped(obj: &Object, received: Timestamp) -> Result<Parsed, ParseError> {
    if obj.contains_key("detail-type") {
        parse_eventbridge(obj, received)
    } else if obj.contains_key("LifecycleTransition") || obj.contains_key("Event") {
        parse_asg_notification(obj, received)
    } else {
        Err(ParseError::UnrecognizedMessage)
    }
}

/// The EventBridge envelope fields every accepted event needs.
struct Envelope<'a> {
    id: &'a str,
    /// The event's `time`, or the receive time when it is unusable.
    time: Timestamp,
    detail: &'a Object,
    /// Only read as a fallback list of Health entities; not validated, since AWS's own samples
    /// disagree on its shape (some show a string).
    resources: Option<&'a Vec<Value>>,
}

fn parse_eventbridge(obj: &Object, received: Timestamp) -> Result<Parsed, ParseError> {
    use detail_type as dt;

    let detail_type = req_str(obj, "detail-type", "detail-type")?;
    // `source` is deliberately not checked: `aws.*` sources cannot be forged with PutEvents, so
    // people test their rules with custom sources, and only our own rules route into the queue.
    let handler: fn(&Envelope<'_>) -> Result<Parsed, ParseError> = match detail_type {
        dt::SPOT_INTERRUPTION => spot_interruption,
        dt::REBALANCE_RECOMMENDATION => rebalance_recommendation,
        dt::STATE_CHANGE => state_change,
        dt::HEALTH => health_event,
        dt::ASG_TERMINATE => asg_terminate_eventbridge,
        dt::ASG_LAUNCH => {
            return Ok(Parsed::Ignore {
                reason: IgnoreReason::AsgLaunching,
            });
        }
        dt::CAPACITY_RESERVATION_INTERRUPTION => capacity_reservation_interruption,
        other => {
            return Err(ParseError::UnknownEvent {
                detail_type: quote(other),
            });
        }
    };
    let (time, time_fallback) = event_time(obj, "time", "time", received);
    let envelope = Envelope {
        id: req_str(obj, "id", "id")?,
        time,
        detail: req_object(obj, "detail", "detail")?,
        resources: obj.get("resources").and_then(Value::as_array),
    };
    handler(&envelope).map(|parsed| with_fallback(parsed, time_fallback))
}

fn spot_interruption(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let instance_id = req_instance_id(env.detail, "instance-id", "detail.instance-id")?;
    let action = opt_str(env.detail, "instance-action", "detail.instance-action")?;
    // `terminate` and `stop` come two minutes ahead; an unknown or missing action is given the
    // documented two minutes too, since hibernation is the only documented exception.
    let deadline = if action == Some(SPOT_ACTION_HIBERNATE) {
        env.time
    } else {
        two_minutes_after(env.time)
    };
    Ok(one(Interruption {
        kind: InterruptionKind::SpotInterruption,
        instance_id,
        event_id: env.id.to_owned(),
        event_time: env.time,
        deadline: Some(deadline),
        lifecycle: None,
        detail: format!("spot {}", quote(action.unwrap_or("interruption"))),
        fallbacks: Vec::new(),
    }))
}

fn rebalance_recommendation(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let instance_id = req_instance_id(env.detail, "instance-id", "detail.instance-id")?;
    Ok(one(Interruption {
        kind: InterruptionKind::RebalanceRecommendation,
        instance_id,
        event_id: env.id.to_owned(),
        event_time: env.time,
        deadline: None,
        lifecycle: None,
        detail: "rebalance recommendation".to_owned(),
        fallbacks: Vec::new(),
    }))
}

fn state_change(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let instance_id = req_instance_id(env.detail, "instance-id", "detail.instance-id")?;
    let state = req_str(env.detail, "state", "detail.state")?;
    match state {
        // Already on its way out (or gone): drain now with no grace budget beyond the event time.
        "stopping" | "shutting-down" | "stopped" | "terminated" => Ok(one(Interruption {
            kind: InterruptionKind::StateChange,
            instance_id,
            event_id: env.id.to_owned(),
            event_time: env.time,
            deadline: Some(env.time),
            lifecycle: None,
            detail: format!("state {state}"),
            fallbacks: Vec::new(),
        })),
        other => Ok(Parsed::Ignore {
            reason: IgnoreReason::InstanceState {
                state: quote(other),
            },
        }),
    }
}

fn health_event(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let d = env.detail;
    let service = req_str(d, "service", "detail.service")?;
    if service != "EC2" {
        return Ok(Parsed::Ignore {
            reason: IgnoreReason::HealthOtherService {
                service: quote(service),
            },
        });
    }
    let category = req_str(d, "eventTypeCategory", "detail.eventTypeCategory")?;
    if category != "scheduledChange" {
        return Ok(Parsed::Ignore {
            reason: IgnoreReason::HealthOtherCategory {
                category: quote(category),
            },
        });
    }
    if opt_str(d, "statusCode", "detail.statusCode")? == Some("closed") {
        return Ok(Parsed::Ignore {
            reason: IgnoreReason::HealthClosed,
        });
    }
    // A Go encoder writes a missing time as "": drain with no deadline rather than not at all.
    let (deadline, start_fallback) = match present(d, "startTime") {
        None => (None, None),
        Some(v) => match v.as_str().and_then(health_time) {
            Some(t) => (Some(t), None),
            None => (
                None,
                Some(Fallback::new(
                    "detail.startTime",
                    Some(v),
                    Instead::NoDeadline,
                )),
            ),
        },
    };
    let code = opt_str(d, "eventTypeCode", "detail.eventTypeCode")?.unwrap_or("scheduledChange");

    // `affectedEntities` is the documented list; the envelope's `resources` repeats it and is a
    // fallback for senders that fill only one. Entities that are not instances (volumes,
    // dedicated hosts, malformed entries) are skipped, not errors: the rest still need draining.
    let entities = opt_array(d, "affectedEntities", "detail.affectedEntities")?
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("entityValue")?.as_str());
    let resources = env
        .resources
        .into_iter()
        .flatten()
        .filter_map(Value::as_str);
    // A 1 MiB message holds about 27,000 entities, and `resources` may repeat each one: the set
    // keeps this linear (a scan of the list per entity took seconds at that size).
    let mut seen: HashSet<&str> = HashSet::new();
    let mut ids: Vec<&str> = Vec::new();
    for id in entities.chain(resources) {
        if is_instance_id(id) && seen.insert(id) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Ok(Parsed::Ignore {
            reason: IgnoreReason::HealthNoInstances,
        });
    }
    let detail = quote(code);
    Ok(Parsed::Interruptions(
        ids.into_iter()
            .map(|id| Interruption {
                kind: InterruptionKind::ScheduledChange,
                instance_id: id.to_owned(),
                event_id: env.id.to_owned(),
                event_time: env.time,
                deadline,
                lifecycle: None,
                detail: detail.clone(),
                fallbacks: start_fallback.clone().into_iter().collect(),
            })
            .collect(),
    ))
}

fn asg_terminate_eventbridge(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let d = env.detail;
    match opt_str(d, "LifecycleTransition", "detail.LifecycleTransition")? {
        None | Some(LIFECYCLE_TERMINATING) => {}
        Some(ASG_TEST_NOTIFICATION) => {
            return Ok(Parsed::Ignore {
                reason: IgnoreReason::AsgTestNotification,
            });
        }
        Some(LIFECYCLE_LAUNCHING) => {
            return Ok(Parsed::Ignore {
                reason: IgnoreReason::AsgLaunching,
            });
        }
        Some(other) => {
            return Err(ParseError::UnknownEvent {
                detail_type: quote(other),
            });
        }
    }
    let lifecycle = lifecycle_action(d, &EVENTBRIDGE_LIFECYCLE_FIELDS)?;
    Ok(one(asg_interruption(lifecycle, env.id, env.time)))
}

fn capacity_reservation_interruption(env: &Envelope<'_>) -> Result<Parsed, ParseError> {
    let d = env.detail;
    let instance_id = if present(d, "instanceId").is_some() && present(d, "instance-id").is_none() {
        req_instance_id(d, "instanceId", "detail.instanceId")?
    } else {
        req_instance_id(d, "instance-id", "detail.instance-id")?
    };
    // AWS documents an explicit `instance-termination-time`; prefer it. If it is absent, the
    // documented two minutes; if it is garbled, the same, noted as a fallback.
    let stated = present(d, "instance-termination-time");
    let (deadline, fallbacks) = match stated
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
    {
        Some(t) => (t, Vec::new()),
        None => (
            two_minutes_after(env.time),
            stated
                .map(|v| {
                    Fallback::new(
                        "detail.instance-termination-time",
                        Some(v),
                        Instead::TwoMinuteWarning,
                    )
                })
                .into_iter()
                .collect(),
        ),
    };
    let action = opt_str(d, "instance-action", "detail.instance-action")?;
    Ok(one(Interruption {
        kind: InterruptionKind::CapacityReservationInterruption,
        instance_id,
        event_id: env.id.to_owned(),
        event_time: env.time,
        deadline: Some(deadline),
        lifecycle: None,
        detail: format!(
            "capacity reservation {}",
            quote(action.unwrap_or("interruption"))
        ),
        fallbacks,
    }))
}

/// Auto Scaling's own notification format, used when a lifecycle hook targets the queue (or an
/// SNS topic) directly instead of going through EventBridge.
fn parse_asg_notification(obj: &Object, received: Timestamp) -> Result<Parsed, ParseError> {
    let event = opt_str(obj, "Event", "Event")?;
    let transition = opt_str(obj, "LifecycleTransition", "LifecycleTransition")?;
    if event == Some(ASG_TEST_NOTIFICATION) || transition == Some(ASG_TEST_NOTIFICATION) {
        return Ok(Parsed::Ignore {
            reason: IgnoreReason::AsgTestNotification,
        });
    }
    match (transition, event) {
        (Some(LIFECYCLE_TERMINATING), _) => {}
        (Some(LIFECYCLE_LAUNCHING), _) => {
            return Ok(Parsed::Ignore {
                reason: IgnoreReason::AsgLaunching,
            });
        }
        // Plain (non-hook) notifications such as `autoscaling:EC2_INSTANCE_TERMINATE` report
        // what already happened and carry no token: nothing left to drain in time.
        (Some(other), _) | (None, Some(other)) => {
            return Err(ParseError::UnknownEvent {
                detail_type: quote(other),
            });
        }
        (None, None) => return Err(ParseError::UnrecognizedMessage),
    }
    let lifecycle = lifecycle_action(obj, &DIRECT_LIFECYCLE_FIELDS)?;
    let request_id = req_str(obj, "RequestId", "RequestId")?;
    let (time, time_fallback) = event_time(obj, "Time", "Time", received);
    Ok(with_fallback(
        one(asg_interruption(lifecycle, request_id, time)),
        time_fallback,
    ))
}

/// Field paths for error messages; the keys are the same in both ASG formats, only the nesting
/// differs.
struct LifecycleFields {
    token: &'static str,
    group: &'static str,
    hook: &'static str,
    instance: &'static str,
}

const EVENTBRIDGE_LIFECYCLE_FIELDS: LifecycleFields = LifecycleFields {
    token: "detail.LifecycleActionToken",
    group: "detail.AutoScalingGroupName",
    hook: "detail.LifecycleHookName",
    instance: "detail.EC2InstanceId",
};

const DIRECT_LIFECYCLE_FIELDS: LifecycleFields = LifecycleFields {
    token: "LifecycleActionToken",
    group: "AutoScalingGroupName",
    hook: "LifecycleHookName",
    instance: "EC2InstanceId",
};

fn lifecycle_action(obj: &Object, f: &LifecycleFields) -> Result<LifecycleAction, ParseError> {
    Ok(LifecycleAction {
        instance_id: req_instance_id(obj, "EC2InstanceId", f.instance)?,
        hook_name: req_str(obj, "LifecycleHookName", f.hook)?.to_owned(),
        group_name: req_str(obj, "AutoScalingGroupName", f.group)?.to_owned(),
        token: opt_str(obj, "LifecycleActionToken", f.token)?
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    })
}

/// No deadline: Auto Scaling waits for the hook's heartbeat timeout, which the controller knows
/// from configuration (and can extend with heartbeats), not from the message. So an unusable
/// event time costs only the event-to-cordon measurement.
fn asg_interruption(
    lifecycle: LifecycleAction,
    event_id: &str,
    event_time: Timestamp,
) -> Interruption {
    Interruption {
        kind: InterruptionKind::AsgTermination,
        instance_id: lifecycle.instance_id.clone(),
        event_id: event_id.to_owned(),
        event_time,
        deadline: None,
        detail: format!("asg hook {}", quote(&lifecycle.hook_name)),
        lifecycle: Some(lifecycle),
        fallbacks: Vec::new(),
    }
}

fn one(interruption: Interruption) -> Parsed {
    Parsed::Interruptions(vec![interruption])
}

/// Adds the envelope's fallback to every interruption and writes each interruption's fallbacks
/// into its detail, so the drain record and Events say what the deadline rests on.
fn with_fallback(parsed: Parsed, envelope: Option<Fallback>) -> Parsed {
    let Parsed::Interruptions(list) = parsed else {
        return parsed;
    };
    Parsed::Interruptions(
        list.into_iter()
            .map(|mut i| {
                i.fallbacks.splice(0..0, envelope.clone());
                for f in &i.fallbacks {
                    i.detail = format!("{}; {f}", i.detail);
                }
                i
            })
            .collect(),
    )
}

/// The event time at `key`, or `received` and a [`Fallback`] when it is missing, not RFC 3339
/// (EventBridge `time`; Auto Scaling `Time`, with milliseconds), or so near the end of time that
/// a deadline two minutes later does not exist.
fn event_time(
    obj: &Object,
    key: &str,
    field: &'static str,
    received: Timestamp,
) -> (Timestamp, Option<Fallback>) {
    let value = present(obj, key);
    let usable = value
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
        .filter(|t| t.checked_add(TWO_MINUTE_WARNING).is_ok());
    match usable {
        Some(t) => (t, None),
        None => (
            received,
            Some(Fallback::new(field, value, Instead::ReceiveTime)),
        ),
    }
}

/// Saturating: [`event_time`] only yields times for which this fits, and the receive time is
/// this machine's clock, so the cap is never reached in practice.
fn two_minutes_after(t: Timestamp) -> Timestamp {
    t.checked_add(TWO_MINUTE_WARNING).unwrap_or(Timestamp::MAX)
}

// ---------------------------------------------------------------------------------------------
// Field access. `null` counts as absent everywhere: several AWS senders emit explicit nulls.

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'a>(obj: &'a Object, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_str<'a>(
    obj: &'a Object,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a str>, ParseError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ParseError::InvalidField {
            field,
            problem: format!("must be a string, not {}", json_type(other)),
        }),
    }
}

fn req_str<'a>(obj: &'a Object, key: &str, field: &'static str) -> Result<&'a str, ParseError> {
    match opt_str(obj, key, field)? {
        None => Err(ParseError::MissingField { field }),
        Some("") => Err(ParseError::InvalidField {
            field,
            problem: "must not be empty".to_owned(),
        }),
        Some(s) => Ok(s),
    }
}

fn req_object<'a>(
    obj: &'a Object,
    key: &str,
    field: &'static str,
) -> Result<&'a Object, ParseError> {
    match present(obj, key) {
        None => Err(ParseError::MissingField { field }),
        Some(Value::Object(o)) => Ok(o),
        Some(other) => Err(ParseError::InvalidField {
            field,
            problem: format!("must be an object, not {}", json_type(other)),
        }),
    }
}

fn opt_array<'a>(
    obj: &'a Object,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a Vec<Value>>, ParseError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(other) => Err(ParseError::InvalidField {
            field,
            problem: format!("must be an array, not {}", json_type(other)),
        }),
    }
}

fn req_instance_id(obj: &Object, key: &str, field: &'static str) -> Result<String, ParseError> {
    let value = req_str(obj, key, field)?;
    if is_instance_id(value) {
        Ok(value.to_owned())
    } else {
        Err(ParseError::InvalidInstanceId {
            field,
            value: quote(value),
        })
    }
}

/// AWS Health sends `startTime` as RFC 2822 ("Sat, 05 Jun 2021 15:10:09 GMT"), sometimes with a
/// weekday that does not match the date (AWS's own sample does), so the weekday is not checked.
/// RFC 3339 is accepted too for hand-made and future events.
fn health_time(s: &str) -> Option<Timestamp> {
    static RFC2822: rfc2822::DateTimeParser = rfc2822::DateTimeParser::new().relaxed_weekday(true);
    RFC2822.parse_timestamp(s).or_else(|_| s.parse()).ok()
}

/// Truncates an input-derived string to [`MAX_QUOTED_CHARS`] characters for display.
fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../tests/fixtures/events/", $name, ".json"))
        };
    }

    const SPOT: &str = fixture!("spot-interruption-warning");
    const REBALANCE: &str = fixture!("rebalance-recommendation");
    const STATE_STOPPING: &str = fixture!("state-change-stopping");
    const HEALTH: &str = fixture!("health-scheduled-change");
    const ASG_EVENTBRIDGE: &str = fixture!("asg-terminate-lifecycle-eventbridge");
    const ASG_DIRECT: &str = fixture!("asg-terminate-lifecycle-direct");
    const ASG_LAUNCH_DIRECT: &str = fixture!("asg-launch-lifecycle-direct");
    const ASG_TEST: &str = fixture!("asg-test-notification");
    const CAPACITY: &str = fixture!("capacity-reservation-interruption");
    const SNS_ASG: &str = fixture!("sns-asg-terminate-lifecycle");
    const SNS_SPOT: &str = fixture!("sns-spot-interruption-warning");

    const ALL_FIXTURES: &[&str] = &[
        SPOT,
        REBALANCE,
        STATE_STOPPING,
        HEALTH,
        ASG_EVENTBRIDGE,
        ASG_DIRECT,
        ASG_LAUNCH_DIRECT,
        ASG_TEST,
        CAPACITY,
        SNS_ASG,
        SNS_SPOT,
    ];

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// When the tests' messages were received: well after every fixture's own time, so a test
    /// can tell which of the two a deadline counts from.
    const RECEIVED: Timestamp = Timestamp::constant(1_800_000_000, 0);

    fn single(body: &str) -> Interruption {
        match parse_message(body, RECEIVED) {
            Ok(Parsed::Interruptions(mut v)) if v.len() == 1 => v.pop().unwrap(),
            other => panic!("expected one interruption, got {other:?}"),
        }
    }

    fn ignored(body: &str) -> IgnoreReason {
        match parse_message(body, RECEIVED) {
            Ok(Parsed::Ignore { reason }) => reason,
            other => panic!("expected Ignore, got {other:?}"),
        }
    }

    fn error(body: &str) -> ParseError {
        match parse_message(body, RECEIVED) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Edits a fixture as JSON so tests state only the difference they care about.
    fn edit(body: &str, f: impl FnOnce(&mut Value)) -> String {
        let mut v: Value = serde_json::from_str(body).unwrap();
        f(&mut v);
        v.to_string()
    }

    // --- one test per accepted format ----------------------------------------------------------

    #[test]
    fn spot_interruption_warning() {
        let i = single(SPOT);
        assert_eq!(i.kind, InterruptionKind::SpotInterruption);
        assert_eq!(i.instance_id, "i-0b662ef9931388ba0");
        assert_eq!(i.event_id, "1e5527d7-bb36-4607-3370-4164db56a40e");
        assert_eq!(i.event_time, ts("2024-05-14T09:31:07Z"));
        assert_eq!(i.deadline, Some(ts("2024-05-14T09:33:07Z")));
        assert_eq!(i.lifecycle, None);
        assert_eq!(i.detail, "spot terminate");
    }

    #[test]
    fn rebalance_recommendation_is_voluntary_without_deadline() {
        let i = single(REBALANCE);
        assert_eq!(i.kind, InterruptionKind::RebalanceRecommendation);
        assert!(i.kind.is_voluntary());
        assert_eq!(i.instance_id, "i-0b662ef9931388ba0");
        assert_eq!(i.event_id, "5d5ab6c5-bd94-a9cd-a70c-1a6d2e8a5a91");
        assert_eq!(i.event_time, ts("2024-05-14T09:25:40Z"));
        assert_eq!(i.deadline, None);
        assert_eq!(i.lifecycle, None);
    }

    #[test]
    fn state_change_stopping_has_deadline_now() {
        let i = single(STATE_STOPPING);
        assert_eq!(i.kind, InterruptionKind::StateChange);
        assert_eq!(i.instance_id, "i-abcd1111");
        assert_eq!(i.event_id, "7bf73129-1428-4cd3-a780-95db273d1602");
        assert_eq!(i.event_time, ts("2024-05-14T10:02:13Z"));
        assert_eq!(i.deadline, Some(ts("2024-05-14T10:02:13Z")));
        assert_eq!(i.detail, "state stopping");
    }

    #[test]
    fn state_change_terminal_states_drain_with_deadline_at_event_time() {
        for state in ["shutting-down", "stopped", "terminated"] {
            let body = edit(STATE_STOPPING, |v| v["detail"]["state"] = state.into());
            let i = single(&body);
            assert_eq!(i.kind, InterruptionKind::StateChange);
            assert_eq!(i.deadline, Some(i.event_time), "{state}");
            assert_eq!(i.detail, format!("state {state}"));
        }
    }

    #[test]
    fn health_scheduled_change_yields_one_interruption_per_instance() {
        let Ok(Parsed::Interruptions(v)) = parse_message(HEALTH, RECEIVED) else {
            panic!("expected interruptions");
        };
        let ids: Vec<_> = v.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(
            ids,
            ["i-0123456789abcdef0", "i-0123456789abcdef1", "i-abcd2222"]
        );
        for i in &v {
            assert_eq!(i.kind, InterruptionKind::ScheduledChange);
            assert_eq!(i.event_id, "7fb65329-1628-4cf3-a740-95fd457b1402");
            assert_eq!(i.event_time, ts("2021-05-22T06:27:57Z"));
            assert_eq!(i.deadline, Some(ts("2021-06-05T15:10:09Z")));
            assert_eq!(i.detail, "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED");
            assert_eq!(i.lifecycle, None);
        }
    }

    #[test]
    fn health_start_time_accepts_rfc3339_and_wrong_weekday_and_may_be_absent() {
        // 5 June 2016 was a Sunday; AWS's documented sample says "Sat".
        let body = edit(HEALTH, |v| {
            v["detail"]["startTime"] = "Sat, 05 Jun 2016 15:10:09 GMT".into()
        });
        assert_eq!(
            single_first(&body).deadline,
            Some(ts("2016-06-05T15:10:09Z"))
        );

        let body = edit(HEALTH, |v| {
            v["detail"]["startTime"] = "2021-06-05T15:10:09+02:00".into()
        });
        assert_eq!(
            single_first(&body).deadline,
            Some(ts("2021-06-05T13:10:09Z"))
        );

        let body = edit(HEALTH, |v| {
            v["detail"].as_object_mut().unwrap().remove("startTime");
        });
        assert_eq!(single_first(&body).deadline, None);
    }

    // --- fail open: unusable optional fields ---------------------------------------------------

    #[test]
    fn spot_hibernation_starts_at_the_event_time() {
        let body = edit(SPOT, |v| {
            v["detail"]["instance-action"] = "hibernate".into()
        });
        let i = single(&body);
        assert_eq!(i.deadline, Some(ts("2024-05-14T09:31:07Z")));
        assert_eq!(i.detail, "spot hibernate");

        for action in ["stop", "terminate"] {
            let body = edit(SPOT, |v| v["detail"]["instance-action"] = action.into());
            assert_eq!(
                single(&body).deadline,
                Some(ts("2024-05-14T09:33:07Z")),
                "{action}"
            );
        }
    }

    #[test]
    fn spot_warning_with_an_empty_time_counts_from_its_receipt() {
        let i = single(&edit(SPOT, |v| v["time"] = "".into()));
        assert_eq!(i.instance_id, "i-0b662ef9931388ba0");
        assert_eq!(i.event_time, RECEIVED);
        assert_eq!(i.deadline, Some(two_minutes_after(RECEIVED)));
        assert_eq!(
            i.fallbacks,
            [Fallback {
                field: "time",
                found: "\"\"".into(),
                instead: Instead::ReceiveTime,
            }]
        );
        assert_eq!(
            i.detail,
            "spot terminate; `time` unusable (\"\"): used the receive time"
        );

        // Garbled, missing, of another type, or too late for a deadline: the same.
        for time in [
            Value::from("yesterday"),
            Value::Null,
            Value::from(1715679067),
            Value::from("9999-12-31T23:59:00Z"),
        ] {
            let i = single(&edit(SPOT, |v| v["time"] = time.clone()));
            assert_eq!(i.event_time, RECEIVED, "{time}");
            assert_eq!(i.fallbacks.len(), 1, "{time}");
        }
        // A hibernating instance received without a usable time is due at once.
        let i = single(&edit(SPOT, |v| {
            v["time"] = "".into();
            v["detail"]["instance-action"] = "hibernate".into();
        }));
        assert_eq!(i.deadline, Some(RECEIVED));
    }

    #[test]
    fn health_event_with_an_empty_or_garbled_start_time_drains_without_deadline() {
        for (start, found) in [
            (Value::from(""), "\"\""),
            (Value::from("next tuesday"), "\"next tuesday\""),
            (Value::from(7), "a number"),
        ] {
            let body = edit(HEALTH, |v| v["detail"]["startTime"] = start.clone());
            let Ok(Parsed::Interruptions(v)) = parse_message(&body, RECEIVED) else {
                panic!("expected interruptions for startTime {start}");
            };
            assert_eq!(v.len(), 3, "every affected instance is drained");
            for i in v {
                assert_eq!(i.deadline, None);
                assert_eq!(i.event_time, ts("2021-05-22T06:27:57Z"));
                assert_eq!(
                    i.fallbacks,
                    [Fallback {
                        field: "detail.startTime",
                        found: found.into(),
                        instead: Instead::NoDeadline,
                    }]
                );
                assert_eq!(
                    i.detail,
                    format!(
                        "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED; `detail.startTime` unusable ({found}): no deadline"
                    )
                );
            }
        }
    }

    #[test]
    fn asg_terminate_with_an_unusable_time_keeps_its_hook() {
        let well_formed = single(ASG_EVENTBRIDGE);
        let i = single(&edit(ASG_EVENTBRIDGE, |v| v["time"] = "not a time".into()));
        assert_eq!(i.event_time, RECEIVED);
        assert_eq!(i.deadline, None, "the hook timeout decides, not the time");
        assert_eq!(i.lifecycle, well_formed.lifecycle);
        assert_eq!(i.fallbacks[0].field, "time");

        let i = single(&edit(ASG_DIRECT, |v| v["Time"] = "".into()));
        assert_eq!(i.event_time, RECEIVED);
        assert_eq!(i.lifecycle, single(ASG_DIRECT).lifecycle);
        assert_eq!(i.fallbacks[0].field, "Time");
    }

    #[test]
    fn health_event_at_the_largest_sqs_message_size_is_parsed_in_linear_time() {
        // 27,000 distinct instances fill a 1 MiB message (SQS's largest); `resources` repeats
        // them all, which is what made the old list scan quadratic.
        const ENTITIES: usize = 27_000;
        let ids: Vec<String> = (0..ENTITIES).map(|n| format!("i-{n:017x}")).collect();
        let body = edit(HEALTH, |v| {
            v["detail"]["affectedEntities"] = ids
                .iter()
                .map(|id| serde_json::json!({ "entityValue": id }))
                .collect();
            v["resources"] = ids.iter().map(|id| Value::from(id.as_str())).collect();
        });

        let started = std::time::Instant::now();
        let Ok(Parsed::Interruptions(v)) = parse_message(&body, RECEIVED) else {
            panic!("expected interruptions");
        };
        let took = started.elapsed();
        let parsed: Vec<&str> = v.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(parsed, ids, "each instance once, in message order");
        // Linear takes tens of milliseconds in a debug build; the quadratic scan took seconds.
        assert!(took < std::time::Duration::from_millis(750), "{took:?}");
    }

    fn single_first(body: &str) -> Interruption {
        match parse_message(body, RECEIVED) {
            Ok(Parsed::Interruptions(v)) => v.into_iter().next().unwrap(),
            other => panic!("expected interruptions, got {other:?}"),
        }
    }

    #[test]
    fn health_skips_non_instance_entities_and_dedupes_resources() {
        let body = edit(HEALTH, |v| {
            v["detail"]["affectedEntities"] = serde_json::json!([
                {"entityValue": "vol-0123456789abcdef0"},
                {"entityValue": "i-0123456789abcdef0"},
                {"entityValue": 42},
                "i-0123456789abcdef9",
                {"entityValue": "i-NOTHEX00"},
            ]);
            v["resources"] = serde_json::json!(["i-0123456789abcdef0", "i-abcd2222"]);
        });
        let Ok(Parsed::Interruptions(v)) = parse_message(&body, RECEIVED) else {
            panic!("expected interruptions");
        };
        let ids: Vec<_> = v.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(ids, ["i-0123456789abcdef0", "i-abcd2222"]);
    }

    #[test]
    fn asg_terminate_lifecycle_via_eventbridge() {
        let i = single(ASG_EVENTBRIDGE);
        assert_eq!(i.kind, InterruptionKind::AsgTermination);
        assert_eq!(i.instance_id, "i-0633ac2b0d9769723");
        assert_eq!(i.event_id, "782d5b4c-0f6f-1fd6-9d62-ecf6aed0a470");
        assert_eq!(i.event_time, ts("2024-05-14T11:19:58Z"));
        assert_eq!(i.deadline, None);
        assert_eq!(
            i.lifecycle,
            Some(LifecycleAction {
                hook_name: "nodedrain-terminate".into(),
                group_name: "eks-workers-spot".into(),
                token: Some("0befcbdb-6ecd-498a-9ff7-ae9b54447cd6".into()),
                instance_id: "i-0633ac2b0d9769723".into(),
            })
        );
        assert_eq!(i.detail, "asg hook nodedrain-terminate");
    }

    #[test]
    fn asg_terminate_lifecycle_direct_to_sqs() {
        let i = single(ASG_DIRECT);
        assert_eq!(i.kind, InterruptionKind::AsgTermination);
        assert_eq!(i.instance_id, "i-0f0e0d0c0b0a09080");
        assert_eq!(i.event_id, "a1b2c3d4-5e6f-7a8b-9c0d-1e2f3a4b5c6d");
        assert_eq!(i.event_time, ts("2024-05-14T11:20:01.533Z"));
        assert_eq!(i.deadline, None);
        assert_eq!(
            i.lifecycle,
            Some(LifecycleAction {
                hook_name: "nodedrain-terminate".into(),
                group_name: "eks-workers-ondemand".into(),
                token: Some("71514b9d-6a40-4b26-8523-05e7eEXAMPLE".into()),
                instance_id: "i-0f0e0d0c0b0a09080".into(),
            })
        );
    }

    #[test]
    fn asg_token_is_optional() {
        let body = edit(ASG_DIRECT, |v| {
            v.as_object_mut().unwrap().remove("LifecycleActionToken");
        });
        assert_eq!(single(&body).lifecycle.unwrap().token, None);
    }

    #[test]
    fn sns_wrapped_asg_notification() {
        assert_eq!(single(SNS_ASG), single(ASG_DIRECT));
    }

    #[test]
    fn sns_wrapped_eventbridge_event() {
        let i = single(SNS_SPOT);
        assert_eq!(i, single(SPOT));
        // The inner id, not the SNS MessageId, so both delivery paths dedupe together.
        assert_eq!(i.event_id, "1e5527d7-bb36-4607-3370-4164db56a40e");
    }

    #[test]
    fn capacity_reservation_uses_termination_time() {
        let i = single(CAPACITY);
        assert_eq!(i.kind, InterruptionKind::CapacityReservationInterruption);
        assert_eq!(i.instance_id, "i-0c0ffee0c0ffee000");
        assert_eq!(i.event_id, "12345678-1234-1234-1234-123456789012");
        assert_eq!(i.event_time, ts("2024-05-14T12:00:00Z"));
        assert_eq!(i.deadline, Some(ts("2024-05-14T12:02:00Z")));
        assert_eq!(i.detail, "capacity reservation terminate");
    }

    #[test]
    fn capacity_reservation_accepts_instance_id_camel_case_and_falls_back_to_two_minutes() {
        let body = edit(CAPACITY, |v| {
            let d = v["detail"].as_object_mut().unwrap();
            let id = d.remove("instance-id").unwrap();
            d.insert("instanceId".into(), id);
            d.insert("instance-termination-time".into(), "soon".into());
            v["time"] = "2024-05-14T12:00:30Z".into();
        });
        let i = single(&body);
        assert_eq!(i.instance_id, "i-0c0ffee0c0ffee000");
        assert_eq!(i.deadline, Some(ts("2024-05-14T12:02:30Z")));
        assert_eq!(
            i.detail,
            "capacity reservation terminate; `detail.instance-termination-time` unusable (\"soon\"): deadline two minutes after the event time"
        );

        let body = edit(CAPACITY, |v| {
            v["detail"]
                .as_object_mut()
                .unwrap()
                .remove("instance-termination-time");
        });
        let i = single(&body);
        assert_eq!(i.deadline, Some(ts("2024-05-14T12:02:00Z")));
        assert_eq!(
            i.fallbacks,
            [],
            "absent is not unusable: AWS may leave it out"
        );
    }

    // --- ignores -------------------------------------------------------------------------------

    #[test]
    fn ignores() {
        assert_eq!(ignored(ASG_TEST), IgnoreReason::AsgTestNotification);
        assert_eq!(ignored(ASG_LAUNCH_DIRECT), IgnoreReason::AsgLaunching);

        for state in ["pending", "running"] {
            let body = edit(STATE_STOPPING, |v| v["detail"]["state"] = state.into());
            assert_eq!(
                ignored(&body),
                IgnoreReason::InstanceState {
                    state: state.into()
                }
            );
        }

        let body = edit(ASG_EVENTBRIDGE, |v| {
            v["detail-type"] = detail_type::ASG_LAUNCH.into();
            v["detail"]["LifecycleTransition"] = LIFECYCLE_LAUNCHING.into();
        });
        assert_eq!(ignored(&body), IgnoreReason::AsgLaunching);

        let body = edit(HEALTH, |v| v["detail"]["service"] = "RDS".into());
        assert_eq!(
            ignored(&body),
            IgnoreReason::HealthOtherService {
                service: "RDS".into()
            }
        );
        let body = edit(HEALTH, |v| {
            v["detail"]["eventTypeCategory"] = "issue".into()
        });
        assert_eq!(
            ignored(&body),
            IgnoreReason::HealthOtherCategory {
                category: "issue".into()
            }
        );
        let body = edit(HEALTH, |v| v["detail"]["statusCode"] = "closed".into());
        assert_eq!(ignored(&body), IgnoreReason::HealthClosed);
        let body = edit(HEALTH, |v| {
            v["detail"]["affectedEntities"] = serde_json::json!([{"entityValue": "vol-0abc"}]);
            v["resources"] = serde_json::json!([]);
        });
        assert_eq!(ignored(&body), IgnoreReason::HealthNoInstances);

        let confirmation = r#"{"Type":"SubscriptionConfirmation","MessageId":"165545c9-2a5c-472c-8df2-7ff2be2b3b1b","Token":"2336412f37","TopicArn":"arn:aws:sns:us-east-1:123456789012:nodedrain","Message":"You have chosen to subscribe to the topic","SubscribeURL":"https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription","Timestamp":"2024-05-14T11:00:00.000Z"}"#;
        let reason = ignored(confirmation);
        assert_eq!(reason.as_label(), "sns_control");
        assert_eq!(reason.to_string(), "SNS SubscriptionConfirmation message");
    }

    #[test]
    fn sns_wrapped_test_notification_is_ignored() {
        let body = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m",
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:t",
            "Message": ASG_TEST,
        })
        .to_string();
        assert_eq!(ignored(&body), IgnoreReason::AsgTestNotification);
    }

    // --- errors --------------------------------------------------------------------------------

    #[test]
    fn error_texts_name_the_field_and_the_problem() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                "not json".into(),
                "malformed_json",
                "message body is not valid JSON: expected ident at line 1 column 2",
            ),
            (
                "[1, 2]".into(),
                "unrecognized_message",
                "message is neither an EventBridge event, an Auto Scaling notification nor an SNS notification",
            ),
            (
                edit(SPOT, |v| {
                    v["detail"].as_object_mut().unwrap().remove("instance-id");
                }),
                "missing_field",
                "missing required field `detail.instance-id`",
            ),
            (
                edit(SPOT, |v| v["detail"]["instance-id"] = "i-123".into()),
                "invalid_instance_id",
                "field `detail.instance-id` is not an EC2 instance id (`i-` and 8 or 17 lowercase hex digits): \"i-123\"",
            ),
            (
                edit(SPOT, |v| v["detail"] = 7.into()),
                "invalid_field",
                "field `detail` must be an object, not a number",
            ),
            (
                edit(SPOT, |v| v["id"] = "".into()),
                "invalid_field",
                "field `id` must not be empty",
            ),
            (
                edit(ASG_DIRECT, |v| v["LifecycleHookName"] = true.into()),
                "invalid_field",
                "field `LifecycleHookName` must be a string, not a boolean",
            ),
            (
                edit(ASG_DIRECT, |v| {
                    v.as_object_mut().unwrap().remove("RequestId");
                }),
                "missing_field",
                "missing required field `RequestId`",
            ),
            (
                edit(SPOT, |v| v["detail-type"] = "EC2 AMI State Change".into()),
                "unknown_event",
                "unsupported event type \"EC2 AMI State Change\"",
            ),
            (
                r#"{"Event":"autoscaling:EC2_INSTANCE_TERMINATE","Progress":50}"#.into(),
                "unknown_event",
                "unsupported event type \"autoscaling:EC2_INSTANCE_TERMINATE\"",
            ),
            (
                serde_json::json!({"Type": "Notification", "TopicArn": "t", "Message": "{oops"})
                    .to_string(),
                "malformed_json",
                "SNS Message is not valid JSON: key must be a string at line 1 column 2",
            ),
            (
                edit(CAPACITY, |v| {
                    v["detail"].as_object_mut().unwrap().remove("instance-id");
                }),
                "missing_field",
                "missing required field `detail.instance-id`",
            ),
        ];
        for (body, label, text) in cases {
            let e = error(&body);
            assert_eq!(
                (e.as_label(), e.to_string().as_str()),
                (label, text),
                "{body}"
            );
        }
    }

    #[test]
    fn quoted_input_is_truncated() {
        let long = "x".repeat(500);
        let e = error(&edit(SPOT, |v| v["detail-type"] = long.clone().into()));
        assert_eq!(
            e.to_string(),
            format!(
                "unsupported event type \"{}…\"",
                "x".repeat(MAX_QUOTED_CHARS)
            )
        );
    }

    // --- kinds and labels ----------------------------------------------------------------------

    fn is_label_value(s: &str) -> bool {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    }

    #[test]
    fn kinds_are_valid_label_values_and_round_trip() {
        assert_eq!(InterruptionKind::ALL.len(), 6);
        for &k in InterruptionKind::ALL {
            assert!(is_label_value(k.as_str()), "{k}");
            assert_eq!(k.as_str().parse::<InterruptionKind>(), Ok(k));
            assert_eq!(
                k.is_voluntary(),
                k == InterruptionKind::RebalanceRecommendation
            );
        }
        assert_eq!(
            "spot".parse::<InterruptionKind>(),
            Err(UnknownKind("spot".into()))
        );
    }

    // --- provider ids --------------------------------------------------------------------------

    #[test]
    fn provider_ids() {
        let ok = [
            (
                "aws:///us-east-1a/i-0123456789abcdef0",
                "i-0123456789abcdef0",
            ),
            ("aws:///i-0123456789abcdef0", "i-0123456789abcdef0"),
            (
                "aws://us-east-1a/i-0123456789abcdef0",
                "i-0123456789abcdef0",
            ),
            ("aws:///us-west-2b/i-abcd1234", "i-abcd1234"),
        ];
        for (p, id) in ok {
            assert_eq!(instance_id_from_provider_id(p), Some(id), "{p}");
        }
        let bad = [
            "",
            "i-0123456789abcdef0",
            "gce://project/zone/i-0123456789abcdef0",
            "aws:///us-east-1a/",
            "aws:///us-east-1a/i-0123456789ABCDEF0",
            "aws:///us-east-1a/i-0123456789abcdef",
            "aws:///us-east-1a/i-0123456789abcdef0/",
            "aws:///us-east-1a/i-0123456789abcdef0x",
            "aws:///us-east-1a/fargate-ip-10-0-1-2.ec2.internal",
            "aws:///us-east-1a/i-01234567 ",
        ];
        for p in bad {
            assert_eq!(instance_id_from_provider_id(p), None, "{p:?}");
        }
    }

    // --- properties ----------------------------------------------------------------------------

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Keys and strings the parser branches on, so random trees reach deep code paths.
        const KEYS: &[&str] = &[
            "Type",
            "TopicArn",
            "Message",
            "detail-type",
            "id",
            "time",
            "detail",
            "resources",
            "instance-id",
            "instanceId",
            "instance-action",
            "instance-termination-time",
            "state",
            "service",
            "eventTypeCategory",
            "eventTypeCode",
            "statusCode",
            "startTime",
            "affectedEntities",
            "entityValue",
            "Event",
            "LifecycleTransition",
            "RequestId",
            "Time",
            "EC2InstanceId",
            "LifecycleHookName",
            "AutoScalingGroupName",
            "LifecycleActionToken",
        ];
        const STRINGS: &[&str] = &[
            detail_type::SPOT_INTERRUPTION,
            detail_type::REBALANCE_RECOMMENDATION,
            detail_type::STATE_CHANGE,
            detail_type::HEALTH,
            detail_type::ASG_TERMINATE,
            detail_type::ASG_LAUNCH,
            detail_type::CAPACITY_RESERVATION_INTERRUPTION,
            "Notification",
            "SubscriptionConfirmation",
            "EC2",
            "scheduledChange",
            "closed",
            "stopping",
            "running",
            LIFECYCLE_TERMINATING,
            LIFECYCLE_LAUNCHING,
            ASG_TEST_NOTIFICATION,
            "i-0123456789abcdef0",
            "i-abcd1234",
            "i-XYZ",
            "2024-05-14T09:31:07Z",
            "9999-12-31T23:59:59Z",
            "Sat, 05 Jun 2021 15:10:09 GMT",
            "",
        ];

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".*".prop_map(Value::from),
                proptest::sample::select(STRINGS).prop_map(Value::from),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => proptest::sample::select(KEYS).prop_map(str::to_owned),
                1 => ".{0,12}",
            ]
        }

        fn json() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(5, 64, 8, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(key(), inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// Every node of a tree, addressed by its path of keys/indices.
        fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
            out.push(prefix.clone());
            match v {
                Value::Object(m) => {
                    for (k, child) in m {
                        prefix.push(Value::from(k.as_str()));
                        paths(child, prefix, out);
                        prefix.pop();
                    }
                }
                Value::Array(a) => {
                    for (i, child) in a.iter().enumerate() {
                        prefix.push(Value::from(i));
                        paths(child, prefix, out);
                        prefix.pop();
                    }
                }
                _ => {}
            }
        }

        fn node_mut<'a>(mut v: &'a mut Value, path: &[Value]) -> &'a mut Value {
            for step in path {
                v = match step {
                    Value::String(k) => &mut v[k.as_str()],
                    _ => &mut v[step.as_u64().unwrap() as usize],
                };
            }
            v
        }

        /// Removes, retypes or garbles one node (SNS `Message` strings get garbled in place, so
        /// the inner document is mutated too).
        fn mutate(v: &mut Value, selector: usize, op: u8, replacement: Value) {
            let mut all = Vec::new();
            paths(v, &mut Vec::new(), &mut all);
            let path = &all[selector % all.len()];
            match (op % 3, path.split_last()) {
                (0, Some((last, parent))) => match (node_mut(v, parent), last) {
                    (Value::Object(m), Value::String(k)) => {
                        m.remove(k);
                    }
                    (Value::Array(a), i) => {
                        a.remove(i.as_u64().unwrap() as usize);
                    }
                    _ => {}
                },
                (1, _) => *node_mut(v, path) = replacement,
                _ => {
                    if let Value::String(s) = node_mut(v, path) {
                        let cut = s
                            .char_indices()
                            .nth(selector % (s.len() + 1))
                            .map_or(s.len(), |c| c.0);
                        s.truncate(cut);
                    }
                }
            }
        }

        fn check_invariants(body: &str) {
            match parse_message(body, RECEIVED) {
                Ok(Parsed::Interruptions(v)) => {
                    assert!(!v.is_empty());
                    for i in v {
                        assert!(is_instance_id(&i.instance_id), "{i:?}");
                        assert_eq!(
                            i.lifecycle.is_some(),
                            i.kind == InterruptionKind::AsgTermination
                        );
                        if let Some(l) = &i.lifecycle {
                            assert_eq!(l.instance_id, i.instance_id);
                        }
                        for f in &i.fallbacks {
                            assert!(i.detail.contains(&f.to_string()), "{i:?}");
                        }
                    }
                }
                Ok(Parsed::Ignore { reason }) => {
                    let _ = (reason.as_label(), reason.to_string());
                }
                Err(e) => {
                    let _ = e.to_string();
                    assert!(!e.as_label().is_empty());
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn never_panics_on_arbitrary_strings(s in any::<String>()) {
                check_invariants(&s);
            }

            #[test]
            fn never_panics_on_arbitrary_json(v in json()) {
                check_invariants(&v.to_string());
            }

            #[test]
            fn never_panics_on_arbitrary_json_in_sns(v in json()) {
                let body = serde_json::json!({
                    "Type": "Notification", "TopicArn": "t", "Message": v.to_string(),
                });
                check_invariants(&body.to_string());
            }

            #[test]
            fn never_panics_on_mutated_samples(
                which in 0..ALL_FIXTURES.len(),
                edits in prop::collection::vec((any::<usize>(), any::<u8>(), json()), 1..4),
            ) {
                let mut v: Value = serde_json::from_str(ALL_FIXTURES[which]).unwrap();
                for (selector, op, replacement) in edits {
                    mutate(&mut v, selector, op, replacement);
                    // Mutate inside SNS Message documents too, not only the envelope.
                    if let Some(Value::String(m)) = v.get_mut("Message")
                        && let Ok(mut inner) = serde_json::from_str::<Value>(m)
                    {
                        mutate(&mut inner, selector / 3, op / 3, Value::Null);
                        *m = inner.to_string();
                    }
                }
                check_invariants(&v.to_string());
            }
        }
    }
}
