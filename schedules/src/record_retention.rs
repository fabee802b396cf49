//! Record retention rules as a pure function: which rule governs a record,
//! and is the record past its retention at `now`?
//!
//! Rules select records by kind, source, collection, jurisdiction and tag;
//! each sets how long records are kept, counted from the record's own
//! creation time. The **most specific** matching rule wins (the one naming
//! the most criteria); among equally specific rules the first in the
//! configuration wins. Records no rule matches follow the default (`forever`
//! unless configured). A record without a creation time never expires (it is
//! reported instead). Legal holds are applied by the caller: they override
//! every rule.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::retention::CalendarDuration;

/// How long records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Keep {
    /// Never expire.
    Forever,
    /// Expire this long after creation (`6y`, `2y6m`, `90d`).
    For(CalendarDuration),
}

impl TryFrom<String> for Keep {
    type Error = String;
    fn try_from(s: String) -> Result<Keep, String> {
        if s == "forever" {
            return Ok(Keep::Forever);
        }
        s.parse::<CalendarDuration>()
            .map(Keep::For)
            .map_err(|e| format!("keep {s:?}: {e} (or \"forever\")"))
    }
}

impl From<Keep> for String {
    fn from(k: Keep) -> String {
        match k {
            Keep::Forever => "forever".into(),
            Keep::For(d) => d.to_string(),
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name shown in reports and the disposal log (default `rule <n>`).
    #[serde(default)]
    pub name: String,
    /// Record kind (`email`, `chat_message`, …).
    pub kind: Option<String>,
    /// Source name.
    pub source: Option<String>,
    /// Collection id (mail folder, channel).
    pub collection: Option<String>,
    /// Jurisdiction code (`EU`, `DE`, `US-CA`): matches the record's value, or
    /// for `EU` any EU member state code.
    pub jurisdiction: Option<String>,
    /// Snapshot tag.
    pub tag: Option<String>,
    /// How long matching records are kept.
    pub keep: Keep,
}

impl Rule {
    fn specificity(&self) -> usize {
        [
            self.kind.is_some(),
            self.source.is_some(),
            self.collection.is_some(),
            self.jurisdiction.is_some(),
            self.tag.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }

    fn matches(&self, r: &RecordFacts<'_>) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        eq(&self.kind, Some(r.kind))
            && eq(&self.source, Some(r.source))
            && eq(&self.collection, Some(r.collection))
            && self.jurisdiction.as_deref().is_none_or(|j| {
                r.jurisdiction
                    .is_some_and(|have| jurisdiction_matches(j, have))
            })
            && self
                .tag
                .as_deref()
                .is_none_or(|t| r.tags.iter().any(|x| x == t))
    }
}

const EU: [&str; 27] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV",
    "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE",
];

fn jurisdiction_matches(rule: &str, record: &str) -> bool {
    let (rule, record) = (rule.to_ascii_uppercase(), record.to_ascii_uppercase());
    rule == record || (rule == "EU" && EU.contains(&record.split('-').next().unwrap_or("")))
}

/// A record policy: rules plus the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPolicy {
    /// Retention of records no rule matches.
    #[serde(default = "forever")]
    pub default: Keep,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

fn forever() -> Keep {
    Keep::Forever
}

impl RecordPolicy {
    /// Give unnamed rules their position as a name.
    pub fn normalized(mut self) -> RecordPolicy {
        for (i, r) in self.rules.iter_mut().enumerate() {
            if r.name.is_empty() {
                r.name = format!("rule {}", i + 1);
            }
        }
        self
    }
}

/// What the policy needs to know about one record.
#[derive(Debug, Clone)]
pub struct RecordFacts<'a> {
    /// Record kind.
    pub kind: &'a str,
    /// Source name.
    pub source: &'a str,
    /// Collection id.
    pub collection: &'a str,
    /// Jurisdiction code, when known.
    pub jurisdiction: Option<&'a str>,
    /// Tags of the snapshot holding the record.
    pub tags: &'a [String],
    /// Creation time at the source.
    pub created: Option<DateTime<Utc>>,
}

/// The decision for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The governing rule (`default` when none matched).
    pub rule: String,
    /// Past its retention at `now`.
    pub expired: bool,
    /// No creation time: it cannot expire.
    pub undated: bool,
}

/// Decide for one record at `now`.
pub fn decide(policy: &RecordPolicy, r: &RecordFacts<'_>, now: DateTime<Utc>) -> Decision {
    let best = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.matches(r))
        .max_by_key(|(i, rule)| (rule.specificity(), std::cmp::Reverse(*i)));
    let (name, keep) = match best {
        Some((_, rule)) => (rule.name.clone(), rule.keep),
        None => ("default".to_string(), policy.default),
    };
    let (expired, undated) = match (keep, r.created) {
        (Keep::Forever, _) => (false, false),
        (Keep::For(_), None) => (false, true),
        (Keep::For(d), Some(created)) => (created < d.window_start(now), false),
    };
    Decision {
        rule: name,
        expired,
        undated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn policy() -> RecordPolicy {
        let text = r#"
            default = "10y"
            [[rule]]
            name = "chat 3y"
            kind = "chat_message"
            keep = "3y"
            [[rule]]
            name = "email 6y"
            kind = "email"
            keep = "6y"
            [[rule]]
            name = "EU chat 2y"
            kind = "chat_message"
            jurisdiction = "EU"
            keep = "2y"
            [[rule]]
            name = "legal forever"
            tag = "legal"
            keep = "forever"
        "#;
        let p: RecordPolicy = toml_from(text);
        p.normalized()
    }

    fn toml_from(text: &str) -> RecordPolicy {
        toml::from_str(text).unwrap()
    }

    fn facts<'a>(
        kind: &'a str,
        jur: Option<&'a str>,
        tags: &'a [String],
        created: &str,
    ) -> RecordFacts<'a> {
        RecordFacts {
            kind,
            source: "s",
            collection: "c",
            jurisdiction: jur,
            tags,
            created: Some(t(created)),
        }
    }

    #[test]
    fn most_specific_rule_wins_and_age_counts_from_creation() {
        let p = policy();
        let now = t("2026-11-22T00:00:00Z");
        let none: Vec<String> = vec![];
        let legal = vec!["legal".to_string()];
        let cases = [
            (
                facts("chat_message", None, &none, "2023-11-21T00:00:00Z"),
                "chat 3y",
                true,
            ),
            (
                facts("chat_message", None, &none, "2023-11-23T00:00:00Z"),
                "chat 3y",
                false,
            ),
            (
                facts("chat_message", Some("DE"), &none, "2024-11-01T00:00:00Z"),
                "EU chat 2y",
                true,
            ),
            (
                facts("chat_message", Some("US"), &none, "2024-11-01T00:00:00Z"),
                "chat 3y",
                false,
            ),
            (
                facts("email", Some("DE"), &none, "2020-01-01T00:00:00Z"),
                "email 6y",
                true,
            ),
            (
                facts("email", None, &none, "2021-01-01T00:00:00Z"),
                "email 6y",
                false,
            ),
            (
                facts("ticket", None, &none, "2015-01-01T00:00:00Z"),
                "default",
                true,
            ),
            (
                facts("ticket", None, &legal, "2015-01-01T00:00:00Z"),
                "legal forever",
                false,
            ),
        ];
        for (f, rule, expired) in cases {
            let d = decide(&p, &f, now);
            assert_eq!((d.rule.as_str(), d.expired), (rule, expired), "{f:?}");
        }
    }

    #[test]
    fn leap_day_and_undated_records() {
        let p = policy();
        let none: Vec<String> = vec![];
        // Created 29 Feb 2020: 6 years later is 28 Feb 2026 (month end clamped).
        let f = facts("email", None, &none, "2020-02-29T12:00:00Z");
        assert!(!decide(&p, &f, t("2026-02-28T11:00:00Z")).expired);
        assert!(decide(&p, &f, t("2026-03-01T00:00:00Z")).expired);
        let mut undated = facts("email", None, &none, "2000-01-01T00:00:00Z");
        undated.created = None;
        let d = decide(&p, &undated, t("2026-01-01T00:00:00Z"));
        assert!(!d.expired && d.undated);
    }

    #[test]
    fn keep_values_parse_and_name_the_bad_one() {
        assert_eq!(
            Keep::try_from("forever".to_string()).unwrap(),
            Keep::Forever
        );
        let e = Keep::try_from("3 years".to_string()).unwrap_err();
        assert!(e.contains("3 years"), "{e}");
    }
}
