//! containerd's filter language (`filters` package), for events and the operator's
//! listings:
//!
//! ```text
//! filters   := filter+               several filters: any may match (OR)
//! filter    := selector ("," selector)*   every selector must match (AND)
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+      (after ~= also /regexp/ or |regexp|)
//! quoted    := a Go string literal between `"` (\n, \t, \xHH, \uHHHH, \ooo, ...)
//! ```
//!
//! A selector without an operator tests presence; `!=` and `~=` see an absent field
//! as "". An empty filter matches everything, as in containerd. Departures, so that
//! the issue's and operators' natural spellings work: `/.../` and `|...|` after `~=`
//! keep their contents as written (only `\/` or `\|` is unescaped, so `\w` reaches
//! the regexp), and only when the closing delimiter ends the value; otherwise the
//! value is plain, so `topic~=/tasks/.+` is the regexp `/tasks/.+`. Regular
//! expressions compile at parse time, so a bad one is an error with its position.

use regex::{Regex, RegexBuilder};

/// The largest filter text accepted, the most filters at once, and the largest
/// compiled regular expression.
pub const MAX_FILTER_BYTES: usize = 4096;
pub const MAX_FILTERS: usize = 64;
const MAX_REGEX_BYTES: usize = 1 << 20;

/// A filter that does not parse: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: {message} at byte {pos} ({})", mark(.input, *.pos))]
pub struct FilterError {
    /// The filter as given.
    pub input: String,
    /// Byte offset of the offending input.
    pub pos: usize,
    /// What was expected or wrong.
    pub message: String,
}

/// `before >|x|< after`, as containerd marks the position.
fn mark(input: &str, pos: usize) -> String {
    let Some(c) = input.get(pos..).and_then(|r| r.chars().next()) else {
        return format!("{input} >||<");
    };
    let end = pos + c.len_utf8();
    format!(
        "{} >|{}|< {}",
        &input[..pos],
        &input[pos..end],
        &input[end..]
    )
}

/// How a selector compares.
#[derive(Clone, Debug)]
pub enum Op {
    /// The field is there.
    Present,
    /// `==`: there and equal.
    Equal(String),
    /// `!=`: not equal (an absent field is "").
    NotEqual(String),
    /// `~=`: the regular expression matches (an absent field is "").
    Matches(Regex),
}

impl PartialEq for Op {
    fn eq(&self, other: &Op) -> bool {
        match (self, other) {
            (Op::Present, Op::Present) => true,
            (Op::Equal(a), Op::Equal(b)) | (Op::NotEqual(a), Op::NotEqual(b)) => a == b,
            (Op::Matches(a), Op::Matches(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// One `<fieldpath>[<op><value>]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    /// The field path, unquoted (`labels."a.b"` is `["labels", "a.b"]`).
    pub path: Vec<String>,
    /// The comparison.
    pub op: Op,
}

/// What a filter reads: a field by path, if the object has it.
pub trait Fields {
    /// The value at `path` (`["event", "id"]`), or `None` when there is none.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl Selector {
    fn matches(&self, obj: &dyn Fields) -> bool {
        let value = obj.field(&self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

/// Filters given together: an object matches when any one of them does (no filters
/// match everything).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// Each filter's selectors, all of which must match.
    pub any_of: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses each filter; the first error is returned.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, FilterError> {
        if filters.len() > MAX_FILTERS {
            return Err(FilterError {
                input: format!("{} filters", filters.len()),
                pos: 0,
                message: format!("at most {MAX_FILTERS} filters at once"),
            });
        }
        let any_of = filters
            .iter()
            .map(|f| parse(f.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        // An empty filter (no selectors) matches everything, so the whole does.
        Ok(Filter { any_of })
    }

    /// Whether `obj` passes.
    pub fn matches(&self, obj: &dyn Fields) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|s| s.matches(obj)))
    }
}

/// One filter's selectors (empty text: none, which matches everything).
pub fn parse(input: &str) -> Result<Vec<Selector>, FilterError> {
    if input.len() > MAX_FILTER_BYTES {
        return Err(FilterError {
            input: input.chars().take(64).collect::<String>() + "...",
            pos: MAX_FILTER_BYTES,
            message: format!("longer than {MAX_FILTER_BYTES} bytes"),
        });
    }
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut p = Parser { input, pos: 0 };
    let mut out = vec![p.selector()?];
    loop {
        p.skip_space();
        match p.peek() {
            None => return Ok(out),
            Some(',') => {
                p.pos += 1;
                out.push(p.selector()?);
            }
            Some(c) => {
                return Err(p.error(p.pos, format!("unexpected {c:?}; expected ',' or the end")));
            }
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    fn error(&self, pos: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_string(),
            pos,
            message: message.into(),
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let path = self.fieldpath()?;
        self.skip_space();
        let op_at = self.pos;
        let op = match self.peek() {
            None | Some(',') => {
                return Ok(Selector {
                    path,
                    op: Op::Present,
                });
            }
            Some('=' | '!' | '~') => self.operator()?,
            Some(c) => {
                return Err(self.error(
                    op_at,
                    format!("unexpected {c:?}; expected an operator (==, !=, ~=), ',' or the end"),
                ));
            }
        };
        self.skip_space();
        let value_at = self.pos;
        let value = self.value(op == "~=")?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                RegexBuilder::new(&value)
                    .size_limit(MAX_REGEX_BYTES)
                    .build()
                    .map_err(|e| self.error(value_at, format!("bad regular expression: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        let start = self.pos;
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if is_field_char(c) => {
                while self.peek().is_some_and(is_field_char) {
                    self.pos += 1;
                }
                Ok(self.input[start..self.pos].to_string())
            }
            Some(c) => Err(self.error(
                start,
                format!("unexpected {c:?}; expected a field name or a quoted field"),
            )),
            None => Err(self.error(start, "expected a field name or a quoted field")),
        }
    }

    fn operator(&mut self) -> Result<&'static str, FilterError> {
        let start = self.pos;
        while matches!(self.peek(), Some('=' | '!' | '~')) {
            self.pos += 1;
        }
        match &self.input[start..self.pos] {
            "==" => Ok("=="),
            "!=" => Ok("!="),
            "~=" => Ok("~="),
            other => Err(self.error(
                start,
                format!("unsupported operator {other:?}; expected ==, != or ~="),
            )),
        }
    }

    fn value(&mut self, regexp: bool) -> Result<String, FilterError> {
        let start = self.pos;
        match self.peek() {
            None | Some(',') => return Err(self.error(start, "expected a value")),
            Some('"') => return self.quoted('"'),
            Some(q) if regexp && is_quote(q) => {
                if let Some(re) = self.delimited(q) {
                    return Ok(re);
                }
            }
            _ => {}
        }
        while self.peek().is_some_and(|c| c != ',' && !c.is_whitespace()) {
            self.pos += self.peek().map_or(1, char::len_utf8);
        }
        Ok(self.input[start..self.pos].to_string())
    }

    /// A `/regexp/` or `|regexp|` at the cursor that closes where the value ends: its
    /// contents as written, with only an escaped delimiter unescaped.
    fn delimited(&mut self, q: char) -> Option<String> {
        let body = &self.input[self.pos + 1..];
        let mut out = String::new();
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if body[i + 1..].starts_with(q) => {
                    out.push(q);
                    chars.next();
                }
                '\\' => {
                    out.push('\\');
                    if let Some((_, n)) = chars.next() {
                        out.push(n);
                    }
                }
                c if c == q => {
                    let end = self.pos + 1 + i + 1;
                    let rest = self.input[end..].chars().next();
                    if rest.is_none_or(|c| c == ',' || c.is_whitespace()) {
                        self.pos = end;
                        return Some(out);
                    }
                    return None;
                }
                '\n' => return None,
                c => out.push(c),
            }
        }
        None
    }

    /// A literal between `q`s with Go's escapes; the cursor moves past it.
    fn quoted(&mut self, q: char) -> Result<String, FilterError> {
        let start = self.pos;
        self.pos += 1;
        let mut bytes = Vec::new();
        loop {
            let at = self.pos;
            let Some(c) = self.peek() else {
                return Err(self.error(start, "quoted text is not terminated"));
            };
            self.pos += c.len_utf8();
            match c {
                c if c == q => break,
                '\n' => return Err(self.error(at, "a newline in quoted text")),
                '\\' => self.escape(q, at, &mut bytes)?,
                c => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        String::from_utf8(bytes).map_err(|_| self.error(start, "quoted text is not UTF-8"))
    }

    fn escape(&mut self, q: char, at: usize, out: &mut Vec<u8>) -> Result<(), FilterError> {
        let bad = |p: &Parser<'_>| p.error(at, "bad escape sequence");
        let c = self.peek().ok_or_else(|| bad(self))?;
        self.pos += c.len_utf8();
        let simple = match c {
            'a' => Some(7u8),
            'b' => Some(8),
            'f' => Some(12),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(11),
            '\\' => Some(b'\\'),
            c if c == q => Some(c as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            return Ok(());
        }
        let (digits, radix) = match c {
            'x' => (2, 16),
            'u' => (4, 16),
            'U' => (8, 16),
            '0'..='7' => {
                self.pos -= 1;
                (3, 8)
            }
            _ => return Err(bad(self)),
        };
        let text = self
            .input
            .get(self.pos..self.pos + digits)
            .ok_or_else(|| bad(self))?;
        if !text.chars().all(|d| d.is_digit(radix)) {
            return Err(bad(self));
        }
        let v = u32::from_str_radix(text, radix).map_err(|_| bad(self))?;
        self.pos += digits;
        match c {
            'x' | '0'..='7' => out.push(u8::try_from(v).map_err(|_| bad(self))?),
            _ => {
                let ch = char::from_u32(v).ok_or_else(|| bad(self))?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
            }
        }
        Ok(())
    }
}

/// A field or value as filter text: bare where the grammar allows, else quoted (a
/// value that starts like a quote or an operator, which the scanner reads greedily
/// as containerd's does, is quoted).
pub fn quote(s: &str, bare: fn(char) -> bool) -> String {
    let starts_badly = s.starts_with(is_quote) || s.starts_with(['=', '!', '~']);
    if !s.is_empty() && s.chars().all(bare) && !starts_badly {
        return s.to_string();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
