//! Bounded label values: no request can grow the number of metric series without bound.
//!
//! Values named in the configuration are always kept. Other values are admitted first come, up to a
//! cap per label; every value after that folds into [`OTHER`]. The first fold of each label is
//! reported once (the caller logs it) and every fold is counted.

use std::collections::HashSet;
use std::sync::Arc;

/// The value unadmitted label values fold into.
pub const OTHER: &str = "other";

/// A client-supplied name: where it came from does not matter (a body, a header, a key, an
/// event), the same rules hold. Persona, chatmode, model, workflow and stage values become metric
/// labels and response headers; sessions and runs become ledger keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameField {
    Persona,
    Chatmode,
    Model,
    Workflow,
    Stage,
    Session,
    Run,
    /// A downstream MCP server's name.
    Server,
    /// An MCP tool's name.
    Tool,
}

/// The longest persona, chatmode, model, workflow or stage name accepted.
pub const MAX_NAME_LEN: usize = 200;
/// The longest session or run id accepted.
pub const MAX_SESSION_LEN: usize = 256;

impl NameField {
    pub fn max_len(self) -> usize {
        match self {
            NameField::Session | NameField::Run => MAX_SESSION_LEN,
            _ => MAX_NAME_LEN,
        }
    }
}

/// Why a name was refused; `reason` names the rule and what a valid value looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    pub reason: String,
}

/// Characters no name may hold although they are not "control" characters to Rust: the
/// bidirectional overrides, embeddings and isolates (after U+202E, a terminal or a
/// dashboard shows the rest of a name reversed), the line and paragraph separators (U+2028 ends a line in JavaScript and
/// in some terminals), zero-width characters and the byte-order mark (two names that look the same).
/// Also every [default-ignorable](is_default_ignorable) code point: a soft hyphen, a tag
/// character or a Hangul filler shows as nothing, so `backend\u{AD}-engineer` would look like a
/// persona it is not.
pub fn is_deceptive(c: char) -> bool {
    matches!(c, '\u{2028}'..='\u{202E}' | '\u{FFF9}'..='\u{FFFB}') || is_default_ignorable(c)
}

/// Unicode's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt, unchanged since Unicode
/// 9): characters a renderer shows as nothing unless it supports them — the soft hyphen, the
/// combining grapheme joiner, Hangul fillers, Mongolian and other variation selectors, zero-width
/// characters, bidirectional formatting, the word joiner and invisible operators, the byte-order
/// mark, shorthand format controls, musical symbol formatting, and the tag characters.
pub fn is_default_ignorable(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}'..='\u{1160}' | '\u{17B4}'..='\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Checks a client-supplied name: 1 to `field.max_len()` bytes after trimming, no control
/// characters (which would break the exposition format and response headers) and no
/// [deceptive](is_deceptive) ones. Returns the trimmed value. The error never echoes the value (it
/// may be a megabyte long).
pub fn check_name(field: NameField, raw: &str) -> Result<&str, NameError> {
    let v = raw.trim();
    let max = field.max_len();
    if v.is_empty() {
        return Err(NameError {
            reason: "must not be empty".into(),
        });
    }
    if v.len() > max {
        return Err(NameError {
            reason: format!("is {} bytes long; at most {max} are accepted", v.len()),
        });
    }
    if let Some(c) = v.chars().find(|&c| c.is_control() || is_deceptive(c)) {
        return Err(NameError {
            reason: format!(
                "must not contain control, bidirectional-override, invisible or default-ignorable characters (found U+{:04X})",
                c as u32
            ),
        });
    }
    Ok(v)
}

/// The longest free text a client may have stored (a gate verdict's reasons): the CLI prints it
/// and the dashboard shows it.
pub const MAX_TEXT_LEN: usize = 2000;

/// Checks client-supplied free text that is stored: at most [`MAX_TEXT_LEN`] bytes, no NUL
/// (newlines and other characters are kept; whatever prints it escapes them). The error never
/// echoes the text.
pub fn check_text(raw: &str) -> Result<(), NameError> {
    if raw.len() > MAX_TEXT_LEN {
        return Err(NameError {
            reason: format!(
                "is {} bytes long; at most {MAX_TEXT_LEN} are accepted",
                raw.len()
            ),
        });
    }
    if raw.contains('\0') {
        return Err(NameError {
            reason: "must not contain NUL characters".into(),
        });
    }
    Ok(())
}

/// The labels whose values come from clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelKind {
    Persona,
    Chatmode,
    Model,
    Workflow,
    Stage,
    /// A downstream MCP server.
    Server,
    /// A tool of a downstream MCP server.
    Tool,
    /// A variant of a workflow stage (an experiment).
    Variant,
}

impl LabelKind {
    pub const ALL: [LabelKind; 8] = [
        LabelKind::Persona,
        LabelKind::Chatmode,
        LabelKind::Model,
        LabelKind::Workflow,
        LabelKind::Stage,
        LabelKind::Server,
        LabelKind::Tool,
        LabelKind::Variant,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LabelKind::Persona => "persona",
            LabelKind::Chatmode => "chatmode",
            LabelKind::Model => "model",
            LabelKind::Workflow => "workflow",
            LabelKind::Stage => "stage",
            LabelKind::Server => "server",
            LabelKind::Tool => "tool",
            LabelKind::Variant => "variant",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The admitted values of one label.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LabelValues {
    /// From the configuration, set again at every (re)configuration: not part of a snapshot.
    #[serde(skip)]
    configured: HashSet<Arc<str>>,
    admitted: HashSet<Arc<str>>,
    folded: u64,
}

/// What [`LabelGuard::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub value: Arc<str>,
    /// True the first time this label folds a value: the caller logs it once.
    pub first_fold: bool,
}

/// The admission state of every client-supplied label.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabelGuard {
    cap: usize,
    /// One per [`LabelKind`]; a snapshot from before a kind existed has fewer (padded on load).
    #[serde(deserialize_with = "padded_labels")]
    labels: [LabelValues; LabelKind::ALL.len()],
    #[serde(skip, default = "other_value")]
    other: Arc<str>,
}

fn fresh_values() -> LabelValues {
    LabelValues {
        configured: HashSet::new(),
        admitted: HashSet::new(),
        folded: 0,
    }
}

fn padded_labels<'de, D>(d: D) -> Result<[LabelValues; LabelKind::ALL.len()], D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let mut stored = Vec::<LabelValues>::deserialize(d)?;
    if stored.len() > LabelKind::ALL.len() {
        return Err(serde::de::Error::custom(format!(
            "{} label kinds stored, this version knows {}",
            stored.len(),
            LabelKind::ALL.len()
        )));
    }
    stored.resize_with(LabelKind::ALL.len(), fresh_values);
    stored
        .try_into()
        .map_err(|_| serde::de::Error::custom("label kinds"))
}

fn other_value() -> Arc<str> {
    Arc::from(OTHER)
}

impl LabelGuard {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            labels: std::array::from_fn(|_| fresh_values()),
            other: Arc::from(OTHER),
        }
    }

    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    /// Replaces the configured (always kept) values of a label; admitted ones stay admitted.
    pub fn set_configured<I, S>(&mut self, kind: LabelKind, values: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let label = &mut self.labels[kind.index()];
        label.configured = values.into_iter().map(|v| Arc::from(v.as_ref())).collect();
    }

    /// The value to put on a series for `raw`: itself when configured or admitted, else `other`.
    pub fn admit(&mut self, kind: LabelKind, raw: &str) -> Admitted {
        let cap = self.cap;
        let label = &mut self.labels[kind.index()];
        if let Some(v) = label.configured.get(raw) {
            return Admitted {
                value: v.clone(),
                first_fold: false,
            };
        }
        if let Some(v) = label.admitted.get(raw) {
            return Admitted {
                value: v.clone(),
                first_fold: false,
            };
        }
        if label.admitted.len() < cap && raw != OTHER {
            let v: Arc<str> = Arc::from(raw);
            label.admitted.insert(v.clone());
            return Admitted {
                value: v,
                first_fold: false,
            };
        }
        label.folded += 1;
        Admitted {
            value: self.other.clone(),
            first_fold: label.folded == 1,
        }
    }

    /// How many values of a label have been folded into `other` so far.
    pub fn folded(&self, kind: LabelKind) -> u64 {
        self.labels[kind.index()].folded
    }

    /// How many distinct non-configured values a label has admitted.
    pub fn admitted_count(&self, kind: LabelKind) -> usize {
        self.labels[kind.index()].admitted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_is_bounded_and_refuses_nul_only() {
        assert_eq!(check_text("two\nlines \u{1b}[31m"), Ok(()));
        assert!(check_text("a\0b").is_err());
        assert!(check_text(&"r".repeat(MAX_TEXT_LEN + 1)).is_err());
    }

    #[test]
    fn names_refuse_control_bidi_and_invisible_characters() {
        for bad in [
            "a\u{1b}[31m",
            "a\0b",
            "evil\u{202E}txt",
            "a\u{2028}b",
            "a\u{200B}b",
            "\u{FEFF}x",
            "a\u{2066}b",
            // Default-ignorable: the probe's soft hyphen, tag character and Hangul filler, a
            // variation selector, the combining grapheme joiner, a shorthand format control.
            "backend\u{AD}-engineer",
            "backend-engineer\u{E0041}",
            "\u{3164}",
            "a\u{FE0F}",
            "a\u{34F}b",
            "a\u{1BCA1}",
            "a\u{E0FFF}",
            "\u{FFA0}x",
        ] {
            let e = check_name(NameField::Persona, bad).unwrap_err();
            assert!(e.reason.contains("U+"), "{bad:?}: {}", e.reason);
        }
        // Just outside the ranges: visible characters stay accepted.
        for (c, ignorable) in [
            ('\u{AC}', false),
            ('\u{AD}', true),
            ('\u{AE}', false),
            ('\u{FDFF}', false),
            ('\u{FE00}', true),
            ('\u{FE10}', false),
            ('\u{DFFFF}', false),
            ('\u{E0000}', true),
            ('\u{E1000}', false),
            ('\u{3163}', false),
            ('\u{3165}', false),
        ] {
            assert_eq!(is_default_ignorable(c), ignorable, "U+{:04X}", c as u32);
        }
        for good in [
            "backend-engineer",
            "ingénieur",
            "工程师",
            "a b",
            "model/gpt-4o:2024",
        ] {
            assert_eq!(check_name(NameField::Persona, good), Ok(good));
        }
    }

    #[test]
    fn configured_values_survive_the_cap_and_new_ones_fold() {
        let mut guard = LabelGuard::new(2);
        guard.set_configured(LabelKind::Persona, ["backend-engineer"]);
        assert_eq!(&*guard.admit(LabelKind::Persona, "a").value, "a");
        assert_eq!(&*guard.admit(LabelKind::Persona, "b").value, "b");
        let third = guard.admit(LabelKind::Persona, "c");
        assert_eq!(&*third.value, OTHER);
        assert!(third.first_fold);
        assert!(!guard.admit(LabelKind::Persona, "d").first_fold);
        assert_eq!(
            &*guard.admit(LabelKind::Persona, "backend-engineer").value,
            "backend-engineer"
        );
        assert_eq!(&*guard.admit(LabelKind::Persona, "a").value, "a");
        assert_eq!(guard.folded(LabelKind::Persona), 2);
        // Other labels have caps of their own.
        assert_eq!(&*guard.admit(LabelKind::Model, "gpt-4").value, "gpt-4");
    }

    #[test]
    fn names_follow_one_rule_set() {
        assert_eq!(check_name(NameField::Model, " gpt-4o "), Ok("gpt-4o"));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        let err = check_name(NameField::Model, &long).unwrap_err();
        assert!(err.reason.contains("201 bytes"), "{err:?}");
        assert!(!err.reason.contains("xxx"));
        assert!(check_name(NameField::Session, &"s".repeat(MAX_SESSION_LEN)).is_ok());
        assert!(check_name(NameField::Persona, "a\nb").is_err());
        assert!(check_name(NameField::Chatmode, "  ").is_err());
    }

    #[test]
    fn a_hundred_thousand_names_stay_bounded() {
        let mut guard = LabelGuard::new(50);
        let mut distinct = HashSet::new();
        for i in 0..100_000 {
            distinct.insert(guard.admit(LabelKind::Persona, &format!("p{i}")).value);
        }
        assert_eq!(distinct.len(), 51);
        assert_eq!(guard.admitted_count(LabelKind::Persona), 50);
    }
}
