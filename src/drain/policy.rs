//! What a pod's drain policy is: its strategy, order and grace, from its annotations, the
//! cluster policy file and the opt-out annotations of Karpenter and the cluster autoscaler.
//!
//! Everything here is pure. Bad input from users (annotations) never fails a drain: it becomes an
//! [`AnnotationWarning`] and the next source of the value applies, because a typo on one pod must
//! not keep a dying node from being drained. Bad input from the operator (the cluster policy
//! file) is an error, because it is read once at start-up where failing loudly is cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use serde::{Deserialize, Serialize};

use crate::names;

/// Errors of policy parsing: only operator input (policy file, `--pod-selector`) can fail.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A strategy name that is not one of the five.
    #[error("unknown strategy {value:?}: expected one of evict, surge, wait, delete, skip")]
    UnknownStrategy {
        /// The rejected text.
        value: String,
    },
    /// A label selector string that kubectl would also reject.
    #[error("invalid label selector {selector:?}: {problem}")]
    InvalidSelector {
        /// The whole selector as given.
        selector: String,
        /// What is wrong, and where.
        problem: String,
    },
    /// The policy file is not valid YAML or does not have the expected shape. The message
    /// names the line and column, and the field or value. Boxed: the parser's error is large,
    /// and every `Result` carrying this one would be too.
    #[error("cluster policy: {0}")]
    Yaml(Box<serde_saphyr::Error>),
    /// A rule whose shape is right but whose value is not.
    #[error("cluster policy rules[{index}].{field}: {problem}")]
    InvalidRule {
        /// Zero-based, like the `rules[N]` paths in YAML errors.
        index: usize,
        /// The field's name as written in the file.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// How a pod leaves a draining node (annotation `nodedrain.io/strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Eviction API; PodDisruptionBudgets respected.
    #[default]
    Evict,
    /// Ready replacement elsewhere first, then evict. Deployment pods only.
    Surge,
    /// Leave the pod until it completes or the deadline comes.
    Wait,
    /// Delete with grace, bypassing PodDisruptionBudgets.
    Delete,
    /// Never touched.
    Skip,
}

impl Strategy {
    /// Every strategy, in documentation order; handy for tests and help texts.
    pub const ALL: [Strategy; 5] = [
        Strategy::Evict,
        Strategy::Surge,
        Strategy::Wait,
        Strategy::Delete,
        Strategy::Skip,
    ];

    /// The annotation value; also a bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Evict => "evict",
            Strategy::Surge => "surge",
            Strategy::Wait => "wait",
            Strategy::Delete => "delete",
            Strategy::Skip => "skip",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = PolicyError;

    /// Exact lowercase names only: annotations are a contract, and accepting `Evict` today
    /// would make rejecting it later a breaking change.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.as_str() == s)
            .ok_or_else(|| PolicyError::UnknownStrategy {
                value: s.to_string(),
            })
    }
}

/// An annotation value nodedrain cannot use. The value is treated as absent (the next source
/// applies) and the executor reports this as a Warning Event on the pod (reason
/// `InvalidAnnotation`), so the workload owner sees it where they look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AnnotationWarning {
    /// The annotation key, one of the constants in [`crate::names`].
    pub annotation: &'static str,
    /// The value as found on the pod.
    pub value: String,
    /// Why it cannot be used, and what applies instead.
    pub problem: String,
}

impl fmt::Display for AnnotationWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {}={:?}: {}",
            self.annotation, self.value, self.problem
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------------------------

/// One requirement of a label selector, with Kubernetes' matching semantics: the negative forms
/// (`!=`, `notin`) also match pods that do not have the label at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals { key: String, value: String },
    /// `key!=value`.
    NotEquals { key: String, value: String },
    /// `key in (a,b)`; never empty.
    In {
        key: String,
        values: BTreeSet<String>,
    },
    /// `key notin (a,b)`; never empty.
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
    /// `key`.
    Exists { key: String },
    /// `!key`.
    DoesNotExist { key: String },
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals { key, value } => labels.get(key) == Some(value),
            Requirement::NotEquals { key, value } => labels.get(key) != Some(value),
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::In { key, values } => write!(f, "{key} in ({})", set(values)),
            Requirement::NotIn { key, values } => write!(f, "{key} notin ({})", set(values)),
            Requirement::Exists { key } => write!(f, "{key}"),
            Requirement::DoesNotExist { key } => write!(f, "!{key}"),
        }
    }
}

/// A parsed label selector: all requirements must match (logical AND). The empty selector
/// matches every pod, as in kubectl.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelectorExpr {
    requirements: Vec<Requirement>,
}

impl LabelSelectorExpr {
    /// The requirements, in the order written.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a pod with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Converts an API `LabelSelector` (as in a PodDisruptionBudget) with the semantics of
    /// `metav1.LabelSelectorAsSelector`. Keys and values are not re-validated: the API server
    /// already did, and being stricter here would make us disagree with the Eviction API.
    pub fn from_api(selector: &LabelSelector) -> Result<Self, PolicyError> {
        let invalid = |problem: String| PolicyError::InvalidSelector {
            selector: format!("{selector:?}"),
            problem,
        };
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals {
                key: key.clone(),
                value: value.clone(),
            });
        }
        for expr in selector.match_expressions.iter().flatten() {
            let key = expr.key.clone();
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(invalid(format!(
                        "{} on {key:?} needs values",
                        expr.operator
                    )));
                }
                "In" => Requirement::In { key, values },
                "NotIn" => Requirement::NotIn { key, values },
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(invalid(format!(
                        "{} on {key:?} takes no values",
                        expr.operator
                    )));
                }
                "Exists" => Requirement::Exists { key },
                "DoesNotExist" => Requirement::DoesNotExist { key },
                other => return Err(invalid(format!("unknown operator {other:?}"))),
            };
            requirements.push(requirement);
        }
        Ok(LabelSelectorExpr { requirements })
    }
}

impl fmt::Display for LabelSelectorExpr {
    /// The canonical kubectl form; parsing it again yields an equal selector.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, requirement) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

impl FromStr for LabelSelectorExpr {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_label_selector(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
    In,
    NotIn,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(s) => write!(f, "{s:?}"),
            Token::Eq => f.write_str("'='"),
            Token::DoubleEq => f.write_str("'=='"),
            Token::NotEq => f.write_str("'!='"),
            Token::Bang => f.write_str("'!'"),
            Token::Open => f.write_str("'('"),
            Token::Close => f.write_str("')'"),
            Token::Comma => f.write_str("','"),
            Token::In => f.write_str("'in'"),
            Token::NotIn => f.write_str("'notin'"),
        }
    }
}

fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '=' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::DoubleEq);
                } else {
                    tokens.push(Token::Eq);
                }
            }
            '!' => {
                chars.next();
                if chars.peek() == Some(&'=') {
                    chars.next();
                    tokens.push(Token::NotEq);
                } else {
                    tokens.push(Token::Bang);
                }
            }
            '(' | ')' | ',' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Comma,
                });
            }
            '<' | '>' => {
                return Err(format!(
                    "operator '{c}' is not supported (only =, ==, !=, in, notin, exists, !)"
                ));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "=!(),<>".contains(c) {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                tokens.push(match word.as_str() {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    _ => Token::Ident(word),
                });
            }
        }
    }
    Ok(tokens)
}

/// A qualified name: `[prefix/]name`, name 1..=63 of `[A-Za-z0-9._-]` starting and ending
/// alphanumeric, prefix a DNS subdomain of at most 253 characters.
fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(format!("key {key:?}: prefix must be a DNS subdomain"));
        }
    }
    if name.is_empty() {
        return Err(format!("key {key:?}: name part must not be empty"));
    }
    validate_value(name).map_err(|_| {
        format!(
            "key {key:?}: name part must be at most 63 characters of [A-Za-z0-9._-], \
             starting and ending alphanumeric"
        )
    })
}

/// A label value: empty, or up to 63 of `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn validate_value(value: &str) -> Result<(), String> {
    let ok = value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "value {value:?}: must be at most 63 characters of [A-Za-z0-9._-], \
             starting and ending alphanumeric"
        ))
    }
}

/// Parses a label selector in kubectl syntax (`a=b,c!=d,e in (f,g),h notin (i),j,!k`). The same
/// parser serves the cluster policy file and `--pod-selector`, so both accept exactly what kubectl
/// accepts (minus the numeric `<`/`>` operators, which drains have no use for).
pub fn parse_label_selector(s: &str) -> Result<LabelSelectorExpr, PolicyError> {
    parse_selector_inner(s).map_err(|problem| PolicyError::InvalidSelector {
        selector: s.to_string(),
        problem,
    })
}

fn parse_selector_inner(s: &str) -> Result<LabelSelectorExpr, String> {
    let tokens = tokenize(s)?;
    let mut requirements = Vec::new();
    if tokens.is_empty() {
        return Ok(LabelSelectorExpr { requirements });
    }
    let mut pos = 0;
    loop {
        let (requirement, next) = parse_requirement(&tokens, pos)?;
        requirements.push(requirement);
        pos = next;
        match tokens.get(pos) {
            None => break,
            Some(Token::Comma) if pos + 1 < tokens.len() => pos += 1,
            Some(Token::Comma) => return Err("trailing ','".to_string()),
            Some(other) => return Err(format!("expected ',' or end, found {other}")),
        }
    }
    Ok(LabelSelectorExpr { requirements })
}

fn expect_key(tokens: &[Token], pos: usize) -> Result<String, String> {
    match tokens.get(pos) {
        Some(Token::Ident(key)) => {
            validate_key(key)?;
            Ok(key.clone())
        }
        Some(other) => Err(format!("expected a label key, found {other}")),
        None => Err("expected a label key, found the end".to_string()),
    }
}

/// Parses one requirement starting at `pos`; returns it and the position after it.
fn parse_requirement(tokens: &[Token], pos: usize) -> Result<(Requirement, usize), String> {
    if tokens.get(pos) == Some(&Token::Bang) {
        let key = expect_key(tokens, pos + 1)?;
        return Ok((Requirement::DoesNotExist { key }, pos + 2));
    }
    let key = expect_key(tokens, pos)?;
    let pos = pos + 1;
    match tokens.get(pos) {
        None | Some(Token::Comma) => Ok((Requirement::Exists { key }, pos)),
        Some(op @ (Token::Eq | Token::DoubleEq | Token::NotEq)) => {
            // `key=` selects an empty value, as in kubectl.
            let (value, next) = match tokens.get(pos + 1) {
                Some(Token::Ident(value)) => (value.clone(), pos + 2),
                None | Some(Token::Comma) => (String::new(), pos + 1),
                Some(other) => return Err(format!("expected a value after {op}, found {other}")),
            };
            validate_value(&value)?;
            let requirement = if *op == Token::NotEq {
                Requirement::NotEquals { key, value }
            } else {
                Requirement::Equals { key, value }
            };
            Ok((requirement, next))
        }
        Some(op @ (Token::In | Token::NotIn)) => {
            if tokens.get(pos + 1) != Some(&Token::Open) {
                return Err(format!("expected '(' after {op}"));
            }
            let mut values = BTreeSet::new();
            let mut at = pos + 2;
            loop {
                match tokens.get(at) {
                    Some(Token::Ident(value)) => {
                        validate_value(value)?;
                        values.insert(value.clone());
                        at += 1;
                    }
                    Some(Token::Close) if values.is_empty() => {
                        return Err(format!("{op} on {key:?} needs at least one value"));
                    }
                    Some(other) => return Err(format!("expected a value, found {other}")),
                    None => return Err("missing ')'".to_string()),
                }
                match tokens.get(at) {
                    Some(Token::Comma) => at += 1,
                    Some(Token::Close) => break,
                    Some(other) => return Err(format!("expected ',' or ')', found {other}")),
                    None => return Err("missing ')'".to_string()),
                }
            }
            let requirement = if *op == Token::In {
                Requirement::In { key, values }
            } else {
                Requirement::NotIn { key, values }
            };
            Ok((requirement, at + 1))
        }
        Some(other) => Err(format!("expected an operator after {key:?}, found {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster policy file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    rules: Option<Vec<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    namespaces: Option<Vec<String>>,
    selector: Option<String>,
    strategy: Option<Strategy>,
    order: Option<i32>,
    grace_period: Option<i64>,
}

/// One rule of the cluster policy. A rule that sets none of strategy, order and grace is allowed:
/// because the first matching rule wins, it shields the pods it matches from later rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyRule {
    /// Empty means every namespace.
    pub namespaces: BTreeSet<String>,
    /// `None` means every pod.
    pub selector: Option<LabelSelectorExpr>,
    pub strategy: Option<Strategy>,
    pub order: Option<i32>,
    /// Seconds, non-negative.
    pub grace_period: Option<i64>,
}

impl PolicyRule {
    /// Whether this rule applies to a pod in `namespace` with `labels`.
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(namespace))
            && self.selector.as_ref().is_none_or(|s| s.matches(labels))
    }
}

/// The operator's policy for workloads whose manifests they cannot change. The first matching
/// rule decides every field it sets; unset fields fall to the defaults (not to later rules),
/// so reading a rule tells you everything it does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPolicy {
    pub rules: Vec<PolicyRule>,
}

impl ClusterPolicy {
    /// Parses the policy file. An empty document means no rules, so an empty ConfigMap key is
    /// not an error.
    pub fn from_yaml(yaml: &str) -> Result<Self, PolicyError> {
        // One line, without the source snippet: the message goes into a log line and an exit
        // status, and the line and column already point at the place.
        let raw: Option<RawPolicy> = serde_saphyr::from_str_with_options(
            yaml,
            serde_saphyr::options! { with_snippet: false },
        )
        .map_err(|e| PolicyError::Yaml(Box::new(e)))?;
        let mut rules = Vec::new();
        for (index, rule) in raw
            .and_then(|r| r.rules)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let selector = rule
                .selector
                .map(|s| {
                    parse_selector_inner(&s).map_err(|problem| PolicyError::InvalidRule {
                        index,
                        field: "selector",
                        problem,
                    })
                })
                .transpose()?;
            if let Some(grace) = rule.grace_period
                && grace < 0
            {
                return Err(PolicyError::InvalidRule {
                    index,
                    field: "gracePeriod",
                    problem: format!("{grace} is negative"),
                });
            }
            let namespaces: BTreeSet<String> =
                rule.namespaces.unwrap_or_default().into_iter().collect();
            if namespaces.iter().any(String::is_empty) {
                return Err(PolicyError::InvalidRule {
                    index,
                    field: "namespaces",
                    problem: "empty namespace name".to_string(),
                });
            }
            rules.push(PolicyRule {
                namespaces,
                selector,
                strategy: rule.strategy,
                order: rule.order,
                grace_period: rule.grace_period,
            });
        }
        Ok(ClusterPolicy { rules })
    }

    /// The first rule matching the pod, with its zero-based index (for explanations).
    pub fn first_match(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<(usize, &PolicyRule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.matches(namespace, labels))
    }
}

// ---------------------------------------------------------------------------------------------
// Pod facts
// ---------------------------------------------------------------------------------------------

/// Grace the kubelet uses when the pod spec does not say (the API default).
pub const DEFAULT_POD_GRACE_SECONDS: i64 = 30;

/// Priority at and above which Kubernetes reserves values for system-critical pods
/// (`system-cluster-critical` is 2e9, `system-node-critical` 2e9 + 1000).
pub const CRITICAL_PRIORITY: i32 = 2_000_000_000;

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The pod's labels; a pod without labels has the empty set.
pub fn pod_labels(pod: &Pod) -> &BTreeMap<String, String> {
    pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS)
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// A static pod's API mirror: deleting it does nothing (the kubelet recreates it) and the
/// Eviction API refuses it, so a drain can only leave it.
pub fn is_mirror_pod(pod: &Pod) -> bool {
    annotation(pod, names::ANNOTATION_MIRROR_POD).is_some()
}

/// The owner reference with `controller: true`: the object that recreates the pod.
pub fn controller_of(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Checked by kind only, like kubectl: the DaemonSet controller ignores cordons and would
/// recreate an evicted pod on the same node at once.
pub fn is_daemonset_pod(pod: &Pod) -> bool {
    controller_of(pod).is_some_and(|r| r.kind == "DaemonSet")
}

/// No controller: once deleted, nothing brings the pod back (kubectl needs `--force`).
pub fn is_bare_pod(pod: &Pod) -> bool {
    controller_of(pod).is_none()
}

/// emptyDir data lives on the node and is lost with the pod (kubectl needs
/// `--delete-emptydir-data`).
pub fn uses_empty_dir(pod: &Pod) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.empty_dir.is_some())
}

/// Succeeded or Failed: no containers run, so there is nothing to drain.
pub fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Critical pods (DNS, CNI, CSI node plugins...) serve the other pods, so they leave after them.
pub fn is_critical(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    matches!(
        spec.priority_class_name.as_deref(),
        Some("system-cluster-critical" | "system-node-critical")
    ) || spec.priority.is_some_and(|p| p >= CRITICAL_PRIORITY)
}

/// The pod's own grace: `terminationGracePeriodSeconds`, or the API default when unset (or
/// negative, which the API rejects and so only appears in hand-made objects).
pub fn pod_grace_seconds(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .filter(|g| *g >= 0)
        .unwrap_or(DEFAULT_POD_GRACE_SECONDS)
}

// ---------------------------------------------------------------------------------------------
// PodDisruptionBudgets
// ---------------------------------------------------------------------------------------------

/// Whether the PDB covers the pod, with the Eviction API's rules (policy/v1): same namespace; a
/// null selector matches nothing, an empty one every pod of the namespace. A selector the API
/// server would not have accepted matches nothing.
pub fn pdb_matches_pod(pdb: &PodDisruptionBudget, pod: &Pod) -> bool {
    let same_namespace = pdb.metadata.namespace.as_deref().unwrap_or_default()
        == pod.metadata.namespace.as_deref().unwrap_or_default();
    if !same_namespace {
        return false;
    }
    let Some(selector) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    LabelSelectorExpr::from_api(selector).is_ok_and(|s| s.matches(pod_labels(pod)))
}

/// Whether the pod's `Ready` condition is `True`: what the disruption controller counts as
/// healthy, and what the Eviction API reads (`podutil.IsPodReady`).
pub fn is_pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What the Eviction API's PDB check reads of the pod itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodHealth {
    pub ready: bool,
    /// Phase `Pending`: the Eviction API deletes it without consulting PDBs.
    pub pending: bool,
}

impl PodHealth {
    pub fn of(pod: &Pod) -> Self {
        PodHealth {
            ready: is_pod_ready(pod),
            pending: pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"),
        }
    }
}

/// A PDB's `spec.unhealthyPodEvictionPolicy` (policy/v1, GA since Kubernetes 1.31).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UnhealthyPodEvictionPolicy {
    /// The default: a not-Ready pod is evicted only while the application is not disrupted
    /// (`currentHealthy >= desiredHealthy`), or within the budget.
    IfHealthyBudget,
    /// A not-Ready pod may always be evicted, whatever the budget: it serves nothing.
    AlwaysAllow,
}

impl fmt::Display for UnhealthyPodEvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnhealthyPodEvictionPolicy::IfHealthyBudget => "IfHealthyBudget",
            UnhealthyPodEvictionPolicy::AlwaysAllow => "AlwaysAllow",
        })
    }
}

/// The PDB's policy; unset (and any value the apiserver would not have accepted) reads as
/// `IfHealthyBudget`, as the Eviction API reads it (it tests for `AlwaysAllow` only).
pub fn unhealthy_pod_eviction_policy(pdb: &PodDisruptionBudget) -> UnhealthyPodEvictionPolicy {
    match pdb
        .spec
        .as_ref()
        .and_then(|s| s.unhealthy_pod_eviction_policy.as_deref())
    {
        Some("AlwaysAllow") => UnhealthyPodEvictionPolicy::AlwaysAllow,
        _ => UnhealthyPodEvictionPolicy::IfHealthyBudget,
    }
}

/// Why the Eviction API evicts a pod without spending a disruption of its only PDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetBypass {
    /// Phase `Pending`: PDBs are not consulted.
    Pending,
    /// Not Ready, and the PDB's `unhealthyPodEvictionPolicy` is `AlwaysAllow`.
    AlwaysAllow,
    /// Not Ready, and the PDB's healthy pods meet its desired count (`IfHealthyBudget`): the
    /// application is not disrupted, so losing a pod that serves nothing is allowed.
    BudgetMet,
}

/// Whether the Eviction API lets this pod go past its only PDB without spending a disruption,
/// from the PDB's last status. Mirrors the apiserver's eviction handler
/// (`pkg/registry/core/pod/storage/eviction.go`, Kubernetes 1.36): a Pending pod is deleted
/// without a PDB check; a not-Ready pod is deleted under `AlwaysAllow`, and under
/// `IfHealthyBudget` when `currentHealthy >= desiredHealthy > 0`; every other pod needs
/// `disruptionsAllowed > 0`. (Terminal and terminating pods pass too; the planner never evicts
/// those.)
pub fn budget_bypass(health: PodHealth, pdb: &PodDisruptionBudget) -> Option<BudgetBypass> {
    if health.pending {
        return Some(BudgetBypass::Pending);
    }
    if health.ready {
        return None;
    }
    if unhealthy_pod_eviction_policy(pdb) == UnhealthyPodEvictionPolicy::AlwaysAllow {
        return Some(BudgetBypass::AlwaysAllow);
    }
    let status = pdb.status.as_ref()?;
    let current = status.current_healthy.unwrap_or(0);
    let desired = status.desired_healthy.unwrap_or(0);
    (desired > 0 && current >= desired).then_some(BudgetBypass::BudgetMet)
}

// ---------------------------------------------------------------------------------------------
// Resolving a pod's policy
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// karpenter.sh/do-not-disrupt
// ---------------------------------------------------------------------------------------------

/// Parses a duration exactly as Go's `time.ParseDuration` does, into nanoseconds: an optional
/// sign, then one or more decimal numbers (with an optional fraction) each followed by a unit of
/// `ns`, `us` (`µs`, `μs`), `ms`, `s`, `m` or `h`, without spaces; `"0"` alone is zero.
///
/// Not `humantime` (nor [`crate::config::parse_duration`]): the `karpenter.sh/do-not-disrupt`
/// value is Karpenter's contract, and Karpenter reads it with Go's grammar. humantime accepts
/// `"1d"`, `"2 hours"` and a bare `"90"`, which Karpenter rejects (and so ignores), and rejects
/// `"1.5h"`, which Karpenter honours; either mismatch would make nodedrain and Karpenter disagree
/// about the same pod.
pub fn parse_go_duration(text: &str) -> Result<i64, String> {
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(format!("invalid duration {text:?}"));
    }
    // i64::MAX nanoseconds (about 292 years) is Go's limit too; one past it for "-".
    let limit: u128 = if negative {
        i64::MAX as u128 + 1
    } else {
        i64::MAX as u128
    };
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after) => {
                let n = after
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(after.len());
                after.split_at(n)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(format!("invalid duration {text:?}"));
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("missing unit in duration {text:?}")),
            other => return Err(format!("unknown unit {other:?} in duration {text:?}")),
        };
        let too_large = || format!("duration {text:?} is too large");
        let mut value: u128 = 0;
        for d in whole.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(d - b'0')))
                .filter(|v| *v <= limit)
                .ok_or_else(too_large)?;
        }
        let mut nanos = value.checked_mul(scale).ok_or_else(too_large)?;
        // Go keeps the fraction's digits as far as they can matter and truncates the rest.
        let mut fraction_value: u128 = 0;
        let mut fraction_scale: u128 = 1;
        for d in fraction.bytes().take(30) {
            fraction_value = fraction_value * 10 + u128::from(d - b'0');
            fraction_scale *= 10;
        }
        nanos += fraction_value * scale / fraction_scale;
        total = total
            .checked_add(nanos)
            .filter(|t| *t <= limit)
            .ok_or_else(too_large)?;
        rest = after;
    }
    let total = i128::try_from(total).map_err(|_| format!("duration {text:?} is too large"))?;
    let signed = if negative { -total } else { total };
    i64::try_from(signed).map_err(|_| format!("duration {text:?} is too large"))
}

/// What a `karpenter.sh/do-not-disrupt` value asks for (Karpenter 1.12 semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoNotDisrupt {
    /// `"true"`: never disrupt voluntarily.
    Indefinitely,
    /// A duration such as `"30m"`: not before the pod has run this long.
    For(Duration),
}

/// Reads a `karpenter.sh/do-not-disrupt` value as Karpenter does: `"true"`, or a positive Go
/// duration. `Ok(None)` for `"false"` (the usual way to say "no", which Karpenter also ignores).
/// `Err` says why anything else is unusable; like Karpenter, the caller then treats the
/// annotation as absent.
pub fn parse_do_not_disrupt(value: &str) -> Result<Option<DoNotDisrupt>, String> {
    match value.trim() {
        "true" => Ok(Some(DoNotDisrupt::Indefinitely)),
        "false" => Ok(None),
        text => {
            let nanos = parse_go_duration(text).map_err(|e| {
                format!("expected \"true\" or a duration such as \"30m\" or \"1h30m\" ({e})")
            })?;
            if nanos <= 0 {
                return Err(format!("duration {text:?} must be positive"));
            }
            Ok(Some(DoNotDisrupt::For(Duration::from_nanos(nanos as u64))))
        }
    }
}

/// When the pod started: `status.startTime`, which the kubelet sets once it has accepted the pod
/// (before image pulls). Karpenter measures a do-not-disrupt duration from here.
pub fn pod_start_time(pod: &Pod) -> Option<jiff::Timestamp> {
    pod.status.as_ref()?.start_time.as_ref().map(|t| t.0)
}

/// A `karpenter.sh/do-not-disrupt` duration that holds the pod on a voluntary drain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The annotation's value, trimmed, for messages (`"30m"`).
    pub value: String,
    pub duration: Duration,
}

/// A pod's policy with the reasons behind it, before node-level options (flags, deadline) apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    pub strategy: Strategy,
    /// Why this strategy, for humans: `annotation nodedrain.io/strategy=surge`,
    /// `cluster policy rules[2]`, `default`...
    pub strategy_reason: String,
    /// No annotation, opt-out or policy rule chose the strategy.
    pub strategy_is_default: bool,
    pub order: i32,
    /// Explicit grace (annotation, else policy rule), before any CLI override or deadline clamp;
    /// `None` means the pod's own.
    pub grace_seconds: Option<i64>,
    /// On voluntary drains, a `karpenter.sh/do-not-disrupt` duration: the step waits until the
    /// pod has run that long, then goes ahead with `strategy`. `None` when no duration applies
    /// (absent, `"true"`, beaten by the strategy annotation, or an involuntary drain).
    pub hold: Option<Hold>,
    pub warnings: Vec<AnnotationWarning>,
}

/// Resolves a pod's strategy, order and grace.
///
/// Precedence for the strategy: a valid `nodedrain.io/strategy` annotation; then, on voluntary
/// drains only, `karpenter.sh/do-not-disrupt: "true"` or
/// `cluster-autoscaler.kubernetes.io/safe-to-evict: "false"` (→ `wait`); then the first matching
/// cluster policy rule; then `evict`. The opt-outs beat the policy file because they are the
/// workload owner's statement about this very pod and err on the safe side; the owner can still
/// override them with the strategy annotation. On involuntary drains the node dies anyway, so the
/// opt-outs are ignored (and the reason says so).
///
/// `karpenter.sh/do-not-disrupt` with a duration (`"30m"`) is not an opt-out but a bound: on
/// voluntary drains the strategy is decided as if it were absent, and [`PodPolicy::hold`] says
/// how long after the pod's start the step must wait first. An unusable value is a warning and
/// counts as absent, as Karpenter treats it.
///
/// For order and grace: annotation, then the matching rule, then the default.
pub fn pod_policy(pod: &Pod, cluster: &ClusterPolicy, voluntary: bool) -> PodPolicy {
    let mut warnings = Vec::new();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let rule = cluster.first_match(namespace, pod_labels(pod));

    let annotated_strategy = annotation(pod, names::ANNOTATION_STRATEGY).and_then(|value| {
        match value.trim().parse::<Strategy>() {
            Ok(strategy) => Some(strategy),
            Err(_) => {
                warnings.push(AnnotationWarning {
                    annotation: names::ANNOTATION_STRATEGY,
                    value: value.to_string(),
                    problem: "not one of evict, surge, wait, delete, skip; ignored".to_string(),
                });
                None
            }
        }
    });

    let mut opt_outs = Vec::new();
    let mut hold = None;
    if let Some(value) = annotation(pod, names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT) {
        let key = names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT;
        match parse_do_not_disrupt(value) {
            Ok(Some(DoNotDisrupt::Indefinitely)) => opt_outs.push(format!("{key}=true")),
            Ok(Some(DoNotDisrupt::For(duration))) => {
                hold = Some(Hold {
                    value: value.trim().to_string(),
                    duration,
                })
            }
            Ok(None) => {}
            Err(problem) => warnings.push(AnnotationWarning {
                annotation: key,
                value: value.to_string(),
                problem: format!("{problem}; ignored"),
            }),
        }
    }
    if let Some(value) = annotation(pod, names::ANNOTATION_CA_SAFE_TO_EVICT) {
        match value.trim() {
            "false" => opt_outs.push(format!("{}=false", names::ANNOTATION_CA_SAFE_TO_EVICT)),
            "true" => {}
            _ => warnings.push(AnnotationWarning {
                annotation: names::ANNOTATION_CA_SAFE_TO_EVICT,
                value: value.to_string(),
                problem: "expected \"false\" or \"true\"; ignored".to_string(),
            }),
        }
    }
    let opt_out = (!opt_outs.is_empty()).then(|| opt_outs.join(", "));

    let mut strategy_is_default = false;
    let (strategy, mut strategy_reason) = if let Some(strategy) = annotated_strategy {
        (
            strategy,
            format!("annotation {}={strategy}", names::ANNOTATION_STRATEGY),
        )
    } else if let (Some(opt_out), true) = (&opt_out, voluntary) {
        (Strategy::Wait, format!("{opt_out} on a voluntary drain"))
    } else if let Some((index, Some(strategy))) = rule.map(|(i, r)| (i, r.strategy)) {
        (strategy, format!("cluster policy rules[{index}]"))
    } else {
        strategy_is_default = true;
        (Strategy::default(), "default".to_string())
    };
    if let (Some(opt_out), false, None) = (&opt_out, voluntary, annotated_strategy) {
        strategy_reason.push_str(&format!("; {opt_out} ignored on an involuntary drain"));
    }
    // A duration only bounds how long the pod is left alone: it applies when nothing stronger
    // decided (the strategy annotation, or an indefinite opt-out, which already means wait),
    // and never on involuntary drains, where the node dies anyway.
    let hold = hold.filter(|_| annotated_strategy.is_none() && opt_out.is_none());
    let hold = match hold {
        Some(hold) if !voluntary => {
            strategy_reason.push_str(&format!(
                "; {}={} ignored on an involuntary drain",
                names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
                hold.value
            ));
            None
        }
        hold => hold,
    };

    let order = annotation(pod, names::ANNOTATION_ORDER)
        .and_then(|value| match value.trim().parse::<i32>() {
            Ok(order) => Some(order),
            Err(_) => {
                warnings.push(AnnotationWarning {
                    annotation: names::ANNOTATION_ORDER,
                    value: value.to_string(),
                    problem: "not a 32-bit integer; ignored".to_string(),
                });
                None
            }
        })
        .or(rule.and_then(|(_, r)| r.order))
        .unwrap_or(0);

    let grace_seconds = annotation(pod, names::ANNOTATION_GRACE_PERIOD)
        .and_then(|value| match value.trim().parse::<i64>() {
            Ok(grace) if grace >= 0 => Some(grace),
            _ => {
                warnings.push(AnnotationWarning {
                    annotation: names::ANNOTATION_GRACE_PERIOD,
                    value: value.to_string(),
                    problem: "not a non-negative number of seconds; ignored".to_string(),
                });
                None
            }
        })
        .or(rule.and_then(|(_, r)| r.grace_period));

    PodPolicy {
        strategy,
        strategy_reason,
        strategy_is_default,
        order,
        grace_seconds,
        hold,
        warnings,
    }
}

/// Whether the pod's owner accepts losing its emptyDir data when it leaves a draining node
/// (`nodedrain.io/allow-local-data-loss: "true"`, a per-pod `--delete-emptydir-data`). Absent or
/// `"false"` is `Ok(false)`; any other value is an [`AnnotationWarning`] and counts as `false`,
/// the safe reading.
pub fn allows_local_data_loss(pod: &Pod) -> Result<bool, AnnotationWarning> {
    match annotation(pod, names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS).map(str::trim) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(AnnotationWarning {
            annotation: names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS,
            value: annotation(pod, names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS)
                .unwrap_or_default()
                .to_string(),
            problem: "expected \"true\" or \"false\"; treated as \"false\"".to_string(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, PodSpec, PodStatus, Volume};
    use k8s_openapi::api::policy::v1::{PodDisruptionBudgetSpec, PodDisruptionBudgetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};

    /// Hand-built pods: a running pod of a ReplicaSet unless told otherwise.
    pub(crate) struct PodBuilder(Pod);

    impl PodBuilder {
        pub(crate) fn new(namespace: &str, name: &str) -> Self {
            let mut pod = Pod {
                metadata: ObjectMeta {
                    namespace: Some(namespace.to_string()),
                    name: Some(name.to_string()),
                    uid: Some(format!("uid-{namespace}-{name}")),
                    ..Default::default()
                },
                spec: Some(PodSpec::default()),
                status: Some(PodStatus {
                    phase: Some("Running".to_string()),
                    ..Default::default()
                }),
            };
            pod.metadata.owner_references =
                Some(vec![owner_ref("ReplicaSet", &format!("{name}-rs"), true)]);
            PodBuilder(pod)
        }

        pub(crate) fn label(mut self, key: &str, value: &str) -> Self {
            self.0
                .metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(key.to_string(), value.to_string());
            self
        }

        pub(crate) fn annotation(mut self, key: &str, value: &str) -> Self {
            self.0
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(key.to_string(), value.to_string());
            self
        }

        /// Replaces the owners with one controller of this kind.
        pub(crate) fn controller(mut self, kind: &str, name: &str) -> Self {
            self.0.metadata.owner_references = Some(vec![owner_ref(kind, name, true)]);
            self
        }

        /// No controller: only a non-controller owner reference, like a bare pod adopted by
        /// nothing.
        pub(crate) fn bare(mut self) -> Self {
            self.0.metadata.owner_references = Some(vec![owner_ref("ConfigMap", "x", false)]);
            self
        }

        pub(crate) fn priority_class(mut self, class: &str) -> Self {
            self.spec().priority_class_name = Some(class.to_string());
            self
        }

        pub(crate) fn priority(mut self, priority: i32) -> Self {
            self.spec().priority = Some(priority);
            self
        }

        pub(crate) fn grace(mut self, seconds: i64) -> Self {
            self.spec().termination_grace_period_seconds = Some(seconds);
            self
        }

        pub(crate) fn empty_dir(mut self) -> Self {
            self.spec().volumes = Some(vec![Volume {
                name: "scratch".to_string(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]);
            self
        }

        pub(crate) fn phase(mut self, phase: &str) -> Self {
            self.0.status.get_or_insert_with(Default::default).phase = Some(phase.to_string());
            self
        }

        /// The `Ready` condition `True`, as the kubelet sets it for a pod that serves.
        pub(crate) fn ready(mut self) -> Self {
            self.0
                .status
                .get_or_insert_with(Default::default)
                .conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "Ready".to_string(),
                status: "True".to_string(),
                ..Default::default()
            }]);
            self
        }

        /// `status.startTime`, as the kubelet sets it.
        pub(crate) fn started(mut self, at: jiff::Timestamp) -> Self {
            self.0
                .status
                .get_or_insert_with(Default::default)
                .start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
            self
        }

        pub(crate) fn mirror(self) -> Self {
            self.annotation(names::ANNOTATION_MIRROR_POD, "abc123")
                .controller("Node", "node-1")
        }

        pub(crate) fn terminating(mut self) -> Self {
            self.0.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            );
            self
        }

        fn spec(&mut self) -> &mut PodSpec {
            self.0.spec.get_or_insert_with(Default::default)
        }

        pub(crate) fn build(self) -> Pod {
            self.0
        }
    }

    fn owner_ref(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".to_string(),
            kind: kind.to_string(),
            name: name.to_string(),
            uid: format!("uid-{kind}-{name}"),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    pub(crate) fn match_labels(labels: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: None,
        }
    }

    pub(crate) fn pdb(
        namespace: &str,
        name: &str,
        selector: Option<LabelSelector>,
        disruptions_allowed: Option<i32>,
    ) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(PodDisruptionBudgetSpec {
                selector,
                ..Default::default()
            }),
            status: disruptions_allowed.map(|n| PodDisruptionBudgetStatus {
                disruptions_allowed: Some(n),
                ..Default::default()
            }),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    // --- Strategy ---

    #[test]
    fn strategy_round_trips_and_rejects_other_spellings() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.as_str().parse::<Strategy>().unwrap(), strategy);
        }
        assert_eq!(Strategy::default(), Strategy::Evict);
        for bad in ["Evict", "EVICT", "", "drain", " evict"] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad:?} accepted");
        }
    }

    // --- Label selectors ---

    #[test]
    fn selector_parses_every_kubectl_operator() {
        let s = parse_label_selector(
            "app=db, tier!=cache,env==prod,zone in (a, b),team notin (x),critical,!legacy",
        )
        .unwrap();
        assert_eq!(s.requirements().len(), 7);
        assert_eq!(
            s.to_string(),
            "app=db,tier!=cache,env=prod,zone in (a,b),team notin (x),critical,!legacy"
        );
        assert_eq!(parse_label_selector(&s.to_string()).unwrap(), s);

        let ok = labels(&[
            ("app", "db"),
            ("env", "prod"),
            ("zone", "a"),
            ("critical", ""),
        ]);
        assert!(s.matches(&ok));
        let mut cache = ok.clone();
        cache.insert("tier".into(), "cache".into());
        assert!(!s.matches(&cache));
        let mut legacy = ok.clone();
        legacy.insert("legacy".into(), "1".into());
        assert!(!s.matches(&legacy));
        let mut team_x = ok.clone();
        team_x.insert("team".into(), "x".into());
        assert!(!s.matches(&team_x));
        let mut zone_c = ok.clone();
        zone_c.insert("zone".into(), "c".into());
        assert!(!s.matches(&zone_c));
        let mut no_critical = ok.clone();
        no_critical.remove("critical");
        assert!(!s.matches(&no_critical));
    }

    #[test]
    fn negative_requirements_match_missing_labels() {
        let s = parse_label_selector("tier!=cache,team notin (x)").unwrap();
        assert!(s.matches(&BTreeMap::new()));
    }

    #[test]
    fn empty_selector_matches_everything_and_empty_value_is_allowed() {
        let s = parse_label_selector("  ").unwrap();
        assert!(s.requirements().is_empty());
        assert!(s.matches(&labels(&[("a", "b")])));
        let empty_value = parse_label_selector("a=,b").unwrap();
        assert!(empty_value.matches(&labels(&[("a", ""), ("b", "x")])));
        assert!(!empty_value.matches(&labels(&[("a", "x"), ("b", "x")])));
        assert!(parse_label_selector("example.com/app=web").is_ok());
    }

    #[test]
    fn selector_rejects_what_kubectl_rejects() {
        for bad in [
            "a=b,",
            ",a",
            "a in ()",
            "a in (b",
            "a in b",
            "a b",
            "a>1",
            "a=(b)",
            "!",
            "a=b=c",
            "-a=b",
            "a=-b",
            "Bad_Prefix!/a=b",
            "/a=b",
            "a/=b",
            "a notin (b,)",
        ] {
            let err = parse_label_selector(bad);
            assert!(
                matches!(err, Err(PolicyError::InvalidSelector { .. })),
                "{bad:?} gave {err:?}"
            );
        }
        let long = format!("a={}", "x".repeat(64));
        assert!(parse_label_selector(&long).is_err());
    }

    // --- Cluster policy ---

    #[test]
    fn cluster_policy_parses_and_first_match_wins() {
        let policy = ClusterPolicy::from_yaml(
            r#"
rules:
  - namespaces: [kube-system, monitoring]
    selector: "app=db,tier!=cache"
    strategy: wait
    order: 10
    gracePeriod: 30
  - selector: "app=db"
    strategy: delete
  - namespaces: [batch]
"#,
        )
        .unwrap();
        assert_eq!(policy.rules.len(), 3);
        let db = labels(&[("app", "db")]);
        let (i, rule) = policy.first_match("monitoring", &db).unwrap();
        assert_eq!(
            (i, rule.strategy, rule.order, rule.grace_period),
            (0, Some(Strategy::Wait), Some(10), Some(30))
        );
        assert_eq!(policy.first_match("default", &db).unwrap().0, 1);
        assert_eq!(policy.first_match("batch", &BTreeMap::new()).unwrap().0, 2);
        assert!(policy.first_match("default", &BTreeMap::new()).is_none());
    }

    #[test]
    fn empty_policy_documents_mean_no_rules() {
        for yaml in ["", "# nothing yet\n", "rules: []", "rules:", "{}"] {
            let policy = ClusterPolicy::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml:?}: {e}"));
            assert!(policy.rules.is_empty());
        }
    }

    #[test]
    fn policy_errors_name_the_place_and_the_field() {
        let cases = [
            (
                "rules:\n  - strategy: wait\n  - stratgy: wait\n",
                "at line 3, column 5",
                "unknown field `stratgy`",
            ),
            ("rules:\n  - strategy: drain\n", "line 2", "drain"),
            (
                "rules:\n  - order: ten\n",
                "at line 2, column 12",
                "invalid i32",
            ),
            (
                "rules:\n  - {}\n  - selector: 'a in ()'\n",
                "rules[1].selector",
                "value",
            ),
            (
                "rules:\n  - gracePeriod: -5\n",
                "rules[0].gracePeriod",
                "negative",
            ),
            (
                "rules:\n  - namespaces: ['']\n",
                "rules[0].namespaces",
                "empty",
            ),
            ("rulez: []\n", "line 1", "unknown field `rulez`"),
        ];
        for (yaml, path, detail) in cases {
            let message = ClusterPolicy::from_yaml(yaml).unwrap_err().to_string();
            assert!(message.contains(path), "{message:?} lacks {path:?}");
            assert!(message.contains(detail), "{message:?} lacks {detail:?}");
        }
    }

    // --- Pod facts ---

    #[test]
    fn pod_facts() {
        let pod = PodBuilder::new("ns", "p").build();
        assert!(!is_mirror_pod(&pod) && !is_daemonset_pod(&pod) && !is_bare_pod(&pod));
        assert_eq!(controller_of(&pod).unwrap().kind, "ReplicaSet");
        assert!(!uses_empty_dir(&pod) && !is_finished(&pod) && !is_critical(&pod));
        assert_eq!(pod_grace_seconds(&pod), 30);

        assert!(is_mirror_pod(&PodBuilder::new("ns", "p").mirror().build()));
        assert!(is_daemonset_pod(
            &PodBuilder::new("ns", "p")
                .controller("DaemonSet", "ds")
                .build()
        ));
        assert!(is_bare_pod(&PodBuilder::new("ns", "p").bare().build()));
        assert!(uses_empty_dir(
            &PodBuilder::new("ns", "p").empty_dir().build()
        ));
        assert!(is_finished(
            &PodBuilder::new("ns", "p").phase("Succeeded").build()
        ));
        assert!(is_finished(
            &PodBuilder::new("ns", "p").phase("Failed").build()
        ));
        assert!(!is_finished(
            &PodBuilder::new("ns", "p").phase("Pending").build()
        ));
        assert!(is_critical(
            &PodBuilder::new("ns", "p")
                .priority_class("system-node-critical")
                .build()
        ));
        assert!(is_critical(
            &PodBuilder::new("ns", "p")
                .priority_class("system-cluster-critical")
                .build()
        ));
        assert!(is_critical(
            &PodBuilder::new("ns", "p").priority(2_000_000_000).build()
        ));
        assert!(!is_critical(
            &PodBuilder::new("ns", "p").priority(1_999_999_999).build()
        ));
        assert!(!is_critical(
            &PodBuilder::new("ns", "p").priority_class("high").build()
        ));
        assert_eq!(
            pod_grace_seconds(&PodBuilder::new("ns", "p").grace(90).build()),
            90
        );
        assert_eq!(
            pod_grace_seconds(&PodBuilder::new("ns", "p").grace(-3).build()),
            30
        );

        let empty = Pod::default();
        assert!(is_bare_pod(&empty) && !is_finished(&empty) && !is_critical(&empty));
        assert_eq!(pod_grace_seconds(&empty), 30);
        assert!(pod_labels(&empty).is_empty());
    }

    // --- PDB matching ---

    #[test]
    fn pdb_selector_semantics() {
        let pod = PodBuilder::new("ns", "p")
            .label("app", "web")
            .label("tier", "front")
            .build();
        let hit = |selector: Option<LabelSelector>| {
            pdb_matches_pod(&pdb("ns", "b", selector, Some(1)), &pod)
        };
        assert!(!hit(None), "a null selector matches nothing");
        assert!(
            hit(Some(LabelSelector::default())),
            "an empty selector matches all"
        );
        assert!(hit(Some(match_labels(&[("app", "web")]))));
        assert!(!hit(Some(match_labels(&[("app", "web"), ("x", "y")]))));
        assert!(
            !pdb_matches_pod(
                &pdb("other", "b", Some(LabelSelector::default()), Some(1)),
                &pod
            ),
            "other namespace"
        );

        let expr = |key: &str, operator: &str, values: Option<&[&str]>| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.to_string(),
                operator: operator.to_string(),
                values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
            }]),
        };
        assert!(hit(Some(expr("app", "In", Some(&["web", "api"])))));
        assert!(!hit(Some(expr("app", "In", Some(&["api"])))));
        assert!(hit(Some(expr("app", "NotIn", Some(&["api"])))));
        assert!(hit(Some(expr("missing", "NotIn", Some(&["api"])))));
        assert!(!hit(Some(expr("app", "NotIn", Some(&["web"])))));
        assert!(hit(Some(expr("tier", "Exists", None))));
        assert!(!hit(Some(expr("missing", "Exists", None))));
        assert!(hit(Some(expr("missing", "DoesNotExist", None))));
        assert!(!hit(Some(expr("app", "DoesNotExist", None))));
        assert!(
            !hit(Some(expr("app", "Matches", Some(&["web"])))),
            "invalid operator"
        );
        assert!(
            !hit(Some(expr("app", "In", Some(&[])))),
            "In without values"
        );

        let mut combined = match_labels(&[("app", "web")]);
        combined.match_expressions = expr("tier", "In", Some(&["back"])).match_expressions;
        assert!(
            !hit(Some(combined)),
            "matchLabels and matchExpressions are ANDed"
        );
    }

    // --- Resolution ---

    fn resolve(pod: PodBuilder, policy: &ClusterPolicy, voluntary: bool) -> PodPolicy {
        pod_policy(&pod.build(), policy, voluntary)
    }

    #[test]
    fn defaults_without_annotations_or_rules() {
        let p = resolve(PodBuilder::new("ns", "p"), &ClusterPolicy::default(), true);
        assert_eq!(p.strategy, Strategy::Evict);
        assert_eq!(p.strategy_reason, "default");
        assert_eq!((p.order, p.grace_seconds), (0, None));
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn annotations_are_read() {
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_STRATEGY, "surge")
                .annotation(names::ANNOTATION_ORDER, "-7")
                .annotation(names::ANNOTATION_GRACE_PERIOD, "45"),
            &ClusterPolicy::default(),
            true,
        );
        assert_eq!(p.strategy, Strategy::Surge);
        assert_eq!(p.strategy_reason, "annotation nodedrain.io/strategy=surge");
        assert_eq!((p.order, p.grace_seconds), (-7, Some(45)));
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn invalid_annotations_warn_and_fall_back() {
        let policy =
            ClusterPolicy::from_yaml("rules:\n  - {strategy: delete, order: 3, gracePeriod: 12}\n")
                .unwrap();
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_STRATEGY, "yeet")
                .annotation(names::ANNOTATION_ORDER, "99999999999")
                .annotation(names::ANNOTATION_GRACE_PERIOD, "-1")
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "yes"),
            &policy,
            true,
        );
        assert_eq!(p.strategy, Strategy::Delete);
        assert_eq!(p.strategy_reason, "cluster policy rules[0]");
        assert_eq!((p.order, p.grace_seconds), (3, Some(12)));
        let annotations: Vec<&str> = p.warnings.iter().map(|w| w.annotation).collect();
        assert_eq!(
            annotations,
            [
                names::ANNOTATION_STRATEGY,
                names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT,
                names::ANNOTATION_ORDER,
                names::ANNOTATION_GRACE_PERIOD
            ]
        );
        assert_eq!(p.warnings[0].value, "yeet");

        let garbage = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_GRACE_PERIOD, "1.5")
                .annotation(names::ANNOTATION_ORDER, "")
                .annotation(names::ANNOTATION_CA_SAFE_TO_EVICT, "maybe"),
            &ClusterPolicy::default(),
            true,
        );
        assert_eq!(
            (garbage.strategy, garbage.order, garbage.grace_seconds),
            (Strategy::Evict, 0, None)
        );
        assert_eq!(garbage.warnings.len(), 3);
    }

    #[test]
    fn opt_outs_mean_wait_on_voluntary_drains_only() {
        let none = ClusterPolicy::default();
        for (key, value) in [
            (names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "true"),
            (names::ANNOTATION_CA_SAFE_TO_EVICT, "false"),
        ] {
            let voluntary = resolve(
                PodBuilder::new("ns", "p").annotation(key, value),
                &none,
                true,
            );
            assert_eq!(voluntary.strategy, Strategy::Wait);
            assert_eq!(
                voluntary.strategy_reason,
                format!("{key}={value} on a voluntary drain")
            );
            let involuntary = resolve(
                PodBuilder::new("ns", "p").annotation(key, value),
                &none,
                false,
            );
            assert_eq!(involuntary.strategy, Strategy::Evict);
            assert!(
                involuntary
                    .strategy_reason
                    .contains("ignored on an involuntary drain")
            );
        }
        for (key, value) in [
            (names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "false"),
            (names::ANNOTATION_CA_SAFE_TO_EVICT, "true"),
        ] {
            let p = resolve(
                PodBuilder::new("ns", "p").annotation(key, value),
                &none,
                true,
            );
            assert_eq!(p.strategy, Strategy::Evict);
            assert!(p.warnings.is_empty());
        }
    }

    #[test]
    fn strategy_annotation_beats_opt_outs_and_policy() {
        let policy = ClusterPolicy::from_yaml("rules:\n  - strategy: skip\n").unwrap();
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "true")
                .annotation(names::ANNOTATION_STRATEGY, "delete"),
            &policy,
            true,
        );
        assert_eq!(p.strategy, Strategy::Delete);
        // Opt-out beats the policy file.
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "true"),
            &policy,
            true,
        );
        assert_eq!(p.strategy, Strategy::Wait);
        // On involuntary drains the policy applies and the ignored opt-out is explained.
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "true"),
            &policy,
            false,
        );
        assert_eq!(p.strategy, Strategy::Skip);
        assert_eq!(
            p.strategy_reason,
            "cluster policy rules[0]; karpenter.sh/do-not-disrupt=true ignored on an involuntary drain"
        );
    }

    #[test]
    fn policy_rule_matching_uses_namespace_and_labels() {
        let policy = ClusterPolicy::from_yaml(
            r"
rules:
  - {namespaces: [kube-system], selector: 'k8s-app=kube-dns', order: 50}
  - {selector: 'app', strategy: wait}
",
        )
        .unwrap();
        let dns = resolve(
            PodBuilder::new("kube-system", "coredns").label("k8s-app", "kube-dns"),
            &policy,
            true,
        );
        assert_eq!((dns.strategy, dns.order), (Strategy::Evict, 50));
        assert_eq!(
            dns.strategy_reason, "default",
            "rule 0 sets no strategy and wins"
        );
        let other = resolve(
            PodBuilder::new("default", "x").label("app", "y"),
            &policy,
            true,
        );
        assert_eq!((other.strategy, other.order), (Strategy::Wait, 0));
        assert_eq!(other.strategy_reason, "cluster policy rules[1]");
        let annotated = resolve(
            PodBuilder::new("kube-system", "coredns")
                .label("k8s-app", "kube-dns")
                .annotation(names::ANNOTATION_ORDER, "1"),
            &policy,
            true,
        );
        assert_eq!(annotated.order, 1);
    }

    #[test]
    fn missing_metadata_is_harmless() {
        let p = pod_policy(&Pod::default(), &ClusterPolicy::default(), false);
        assert_eq!(p.strategy, Strategy::Evict);
    }

    #[test]
    fn local_data_loss_opt_in() {
        let with = |value: &str| {
            allows_local_data_loss(
                &PodBuilder::new("ns", "p")
                    .annotation(names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS, value)
                    .build(),
            )
        };
        assert_eq!(
            allows_local_data_loss(&PodBuilder::new("ns", "p").build()),
            Ok(false)
        );
        assert_eq!(with("true"), Ok(true));
        assert_eq!(with(" true "), Ok(true));
        assert_eq!(with("false"), Ok(false));
        let warning = with("yes").unwrap_err();
        assert_eq!(warning.annotation, names::ANNOTATION_ALLOW_LOCAL_DATA_LOSS);
        assert_eq!(warning.value, "yes");
    }

    // --- karpenter.sh/do-not-disrupt durations ---

    #[test]
    fn go_durations_parse_as_go_does() {
        let ok = |text: &str| parse_go_duration(text).unwrap();
        assert_eq!(ok("30m"), 30 * 60 * 1_000_000_000);
        assert_eq!(ok("1h30m"), 90 * 60 * 1_000_000_000);
        assert_eq!(ok("1.5h"), 90 * 60 * 1_000_000_000);
        assert_eq!(ok(".5s"), 500_000_000);
        assert_eq!(ok("1.s"), 1_000_000_000);
        assert_eq!(ok("300ms"), 300_000_000);
        assert_eq!(
            ok("2h45m30.5s"),
            (2 * 3600 + 45 * 60 + 30) * 1_000_000_000 + 500_000_000
        );
        assert_eq!(ok("1us"), 1_000);
        assert_eq!(ok("1\u{b5}s"), 1_000);
        assert_eq!(ok("1\u{3bc}s"), 1_000);
        assert_eq!(ok("10ns"), 10);
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("-0"), 0);
        assert_eq!(ok("+5s"), 5_000_000_000);
        assert_eq!(ok("-5s"), -5_000_000_000);
        assert_eq!(ok("2562047h"), 2_562_047 * 3_600_000_000_000);
        // What Go rejects, and humantime (or a bare number of seconds) would accept.
        for bad in [
            "", "90", "1d", "1w", "30 m", "30min", "1h 30m", "m", ".s", "5x", "-", "1.5.5s",
            "2562048h", " 30m",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn do_not_disrupt_values_read_like_karpenter() {
        assert_eq!(
            parse_do_not_disrupt("true"),
            Ok(Some(DoNotDisrupt::Indefinitely))
        );
        assert_eq!(parse_do_not_disrupt("false"), Ok(None));
        assert_eq!(
            parse_do_not_disrupt(" 30m "),
            Ok(Some(DoNotDisrupt::For(Duration::from_secs(1800))))
        );
        assert_eq!(
            parse_do_not_disrupt("1h30m"),
            Ok(Some(DoNotDisrupt::For(Duration::from_secs(5400))))
        );
        // Karpenter: zero or negative durations are invalid, and so is everything else.
        assert!(
            parse_do_not_disrupt("0s")
                .unwrap_err()
                .contains("must be positive")
        );
        assert!(
            parse_do_not_disrupt("-5m")
                .unwrap_err()
                .contains("must be positive")
        );
        let unparseable = parse_do_not_disrupt("1d").unwrap_err();
        assert!(
            unparseable.contains("expected \"true\" or a duration such as \"30m\""),
            "{unparseable}"
        );
        assert!(unparseable.contains("unknown unit \"d\""), "{unparseable}");
        assert!(parse_do_not_disrupt("True").is_err());
    }

    #[test]
    fn a_do_not_disrupt_duration_holds_voluntary_drains_only() {
        let none = ClusterPolicy::default();
        let pod = || {
            PodBuilder::new("ns", "p").annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "30m")
        };
        // Voluntary: the strategy is what it would be without the annotation, with a hold.
        let p = resolve(pod(), &none, true);
        assert_eq!(p.strategy, Strategy::Evict);
        assert_eq!(
            p.hold,
            Some(Hold {
                value: "30m".to_string(),
                duration: Duration::from_secs(1800)
            })
        );
        assert!(p.warnings.is_empty());
        let rule = ClusterPolicy::from_yaml("rules:\n  - strategy: delete\n").unwrap();
        let p = resolve(pod(), &rule, true);
        assert_eq!((p.strategy, p.hold.is_some()), (Strategy::Delete, true));
        // Involuntary: ignored, and the reason says so.
        let p = resolve(pod(), &none, false);
        assert_eq!(p.hold, None);
        assert_eq!(
            p.strategy_reason,
            "default; karpenter.sh/do-not-disrupt=30m ignored on an involuntary drain"
        );
        // The strategy annotation decides alone; an indefinite opt-out already waits.
        let p = resolve(
            pod().annotation(names::ANNOTATION_STRATEGY, "evict"),
            &none,
            true,
        );
        assert_eq!((p.strategy, p.hold), (Strategy::Evict, None));
        let p = resolve(
            pod().annotation(names::ANNOTATION_CA_SAFE_TO_EVICT, "false"),
            &none,
            true,
        );
        assert_eq!((p.strategy, p.hold), (Strategy::Wait, None));
        // "true" keeps its meaning.
        let p = resolve(
            PodBuilder::new("ns", "p")
                .annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "true"),
            &none,
            true,
        );
        assert_eq!((p.strategy, p.hold), (Strategy::Wait, None));
    }

    #[test]
    fn an_unparseable_do_not_disrupt_value_warns_and_counts_as_absent() {
        let p = resolve(
            PodBuilder::new("ns", "p").annotation(names::ANNOTATION_KARPENTER_DO_NOT_DISRUPT, "1d"),
            &ClusterPolicy::default(),
            true,
        );
        assert_eq!((p.strategy, p.hold), (Strategy::Evict, None));
        assert_eq!(p.warnings.len(), 1);
        assert_eq!(p.warnings[0].value, "1d");
        assert_eq!(
            p.warnings[0].to_string(),
            "annotation karpenter.sh/do-not-disrupt=\"1d\": expected \"true\" or a duration \
             such as \"30m\" or \"1h30m\" (unknown unit \"d\" in duration \"1d\"); ignored"
        );
    }
}
