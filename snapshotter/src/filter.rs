//! containerd's list filters, the part a snapshotter sees: selectors joined by `,`
//! (all must match) on `name`, `parent`, `kind` and `labels.KEY` (KEY may be
//! quoted), each `FIELD` (present), `FIELD==VALUE` or `FIELD!=VALUE` (VALUE may be
//! quoted). Regular-expression matches (`~=`) are refused as unsupported.

use containerd_snapshots::{Info, Kind};

use crate::error::SnapError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

/// One filter: every selector must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<(Field, Op)>);

/// Longest filter accepted.
const MAX_FILTER: usize = 16 << 10;

fn unquote(s: &str) -> Result<String, SnapError> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| SnapError::InvalidArgument(format!("filter: unterminated quote in {s}")))?;
        return Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"));
    }
    Ok(s.to_string())
}

/// Split on `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Find `op` outside quotes.
fn find_op(s: &str, op: &str) -> Option<usize> {
    let mut quoted = false;
    let b = s.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'"' {
            quoted = !quoted;
        } else if !quoted && s.is_char_boundary(i) && s[i..].starts_with(op) {
            return Some(i);
        }
    }
    None
}

impl Filter {
    /// Parse one filter string.
    pub fn parse(s: &str) -> Result<Filter, SnapError> {
        if s.len() > MAX_FILTER {
            return Err(SnapError::InvalidArgument(format!("filter is {} bytes long; at most {MAX_FILTER}", s.len())));
        }
        let mut sel = Vec::new();
        for part in split_outside_quotes(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if find_op(part, "~=").is_some() {
                return Err(SnapError::InvalidArgument(format!(
                    "filter \"{part}\": regular-expression matches (~=) are not supported"
                )));
            }
            let (field, op) = if let Some(i) = find_op(part, "==") {
                (&part[..i], Op::Eq(unquote(&part[i + 2..])?))
            } else if let Some(i) = find_op(part, "!=") {
                (&part[..i], Op::Ne(unquote(&part[i + 2..])?))
            } else {
                (part, Op::Present)
            };
            let field = match field.trim() {
                "name" => Field::Name,
                "parent" => Field::Parent,
                "kind" => Field::Kind,
                f => match f.strip_prefix("labels.") {
                    Some(k) if !k.is_empty() => Field::Label(unquote(k)?),
                    _ => {
                        return Err(SnapError::InvalidArgument(format!(
                            "filter \"{part}\": unknown field \"{f}\" (name, parent, kind, labels.KEY)"
                        )))
                    }
                },
            };
            sel.push((field, op));
        }
        Ok(Filter(sel))
    }

    /// Does `info` match?
    pub fn matches(&self, info: &Info) -> bool {
        self.0.iter().all(|(field, op)| {
            let value: Option<String> = match field {
                Field::Name => Some(info.name.clone()),
                Field::Parent => Some(info.parent.clone()).filter(|p| !p.is_empty()),
                Field::Kind => Some(
                    match info.kind {
                        Kind::Active => "active",
                        Kind::View => "view",
                        Kind::Committed => "committed",
                        Kind::Unknown => "unknown",
                    }
                    .to_string(),
                ),
                Field::Label(k) => info.labels.get(k).cloned(),
            };
            match op {
                Op::Present => value.is_some(),
                Op::Eq(v) => value.as_deref() == Some(v.as_str()),
                Op::Ne(v) => value.as_deref() != Some(v.as_str()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, parent: &str, labels: &[(&str, &str)]) -> Info {
        Info {
            kind: Kind::Committed,
            name: name.into(),
            parent: parent.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn selectors_match_fields_and_quoted_labels() {
        let i = info("a", "p", &[("containerd.io/gc.root", "x,y"), ("k", "v")]);
        for (f, want) in [
            ("name==a", true),
            ("name==b", false),
            ("parent==p,kind==committed", true),
            ("kind!=committed", false),
            (r#"labels."containerd.io/gc.root"=="x,y""#, true),
            ("labels.k", true),
            ("labels.missing", false),
            ("labels.k!=w, name==a", true),
        ] {
            assert_eq!(Filter::parse(f).expect(f).matches(&i), want, "{f}");
        }
        assert!(!Filter::parse("parent").expect("p").matches(&info("a", "", &[])));
    }

    #[test]
    fn unsupported_or_malformed_filters_are_invalid_arguments() {
        for f in ["name~=a.*", "size==3", "labels.", r#"name=="a"#] {
            assert!(matches!(Filter::parse(f), Err(SnapError::InvalidArgument(_))), "{f}");
        }
        assert!(Filter::parse(&"x".repeat(20 << 10)).is_err());
    }
}
