//! The text syntax of queries, as typed on the command line:
//!
//! ```text
//! status:ReadyToShip AND amount:>100
//! (region:eu OR region:us) AND NOT status:Held
//! amount:[10 TO 20]    status:(New, Held)     name:Ab*     body:~"quick fox"
//! amount:>=5  amount:<=5  amount:<5  status:!=Held  exists(note)  missing(note)   *
//! ```
//!
//! Values are numbers (`100`, `-2.5`, `1e9`), `true`/`false`, bare words (`ReadyToShip`,
//! `A-1`, `2024-05-01`) or double-quoted strings with `\"`, `\\`, `\n`, `\t` and
//! `\u{..}` escapes. `NOT` binds tighter than `AND`, which binds tighter than `OR`;
//! operators are upper case. `*` alone matches every entry of the type. Printing a query
//! (`to_string()`) gives text that parses back to the same query.

use std::fmt::{self, Display, Write};

use crate::error::{QueryError, Result};
use crate::names::is_field_char;
use crate::query::{Filter, Query};
use crate::value::Value;

impl Query {
    /// Parses the text syntax into a query for `entry_type`, and validates it.
    ///
    /// # Errors
    /// [`QueryError::Syntax`] with the byte position of the problem, or the validation
    /// errors of [`Query::validate`].
    pub fn parse(entry_type: &str, text: &str) -> Result<Query> {
        let mut p = Parser {
            text,
            pos: 0,
            depth: 0,
        };
        p.skip_ws();
        let filter = if p.at_end() {
            Filter::All
        } else {
            let f = p.expr()?;
            p.skip_ws();
            if !p.at_end() {
                return Err(p.error(format!(
                    "expected AND, OR or the end of the query, found {}",
                    p.describe_next()
                )));
            }
            f
        };
        let q = Query::new(entry_type, filter);
        q.validate()?;
        Ok(q)
    }
}

impl Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.filter().fmt(f)
    }
}

impl Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::All => f.write_str("*"),
            Filter::Eq(p, v) => write!(f, "{p}:{}", Lit(v)),
            Filter::Ne(p, v) => write!(f, "{p}:!={}", Lit(v)),
            Filter::Lt(p, v) => write!(f, "{p}:<{}", Lit(v)),
            Filter::Le(p, v) => write!(f, "{p}:<={}", Lit(v)),
            Filter::Gt(p, v) => write!(f, "{p}:>{}", Lit(v)),
            Filter::Ge(p, v) => write!(f, "{p}:>={}", Lit(v)),
            Filter::Between(p, a, b) => write!(f, "{p}:[{} TO {}]", Lit(a), Lit(b)),
            Filter::In(p, vs) => {
                write!(f, "{p}:(")?;
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}", Lit(v))?;
                }
                f.write_char(')')
            }
            Filter::Exists(p) => write!(f, "exists({p})"),
            Filter::Missing(p) => write!(f, "missing({p})"),
            Filter::Prefix(p, s) => write!(f, "{p}:{}*", StrLit(s)),
            Filter::Text(p, s) => write!(f, "{p}:~{}", StrLit(s)),
            Filter::And(parts) => join(f, parts, " AND ", |p| {
                matches!(p, Filter::Or(_) | Filter::And(_))
            }),
            Filter::Or(parts) => join(f, parts, " OR ", |p| matches!(p, Filter::Or(_))),
            Filter::Not(inner) => {
                if matches!(**inner, Filter::And(_) | Filter::Or(_)) {
                    write!(f, "NOT ({inner})")
                } else {
                    write!(f, "NOT {inner}")
                }
            }
        }
    }
}

fn join(
    f: &mut fmt::Formatter<'_>,
    parts: &[Filter],
    sep: &str,
    needs_parens: impl Fn(&Filter) -> bool,
) -> fmt::Result {
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        if needs_parens(part) {
            write!(f, "({part})")?;
        } else {
            write!(f, "{part}")?;
        }
    }
    Ok(())
}

/// Characters that end a bare word.
fn is_bare_char(c: char) -> bool {
    !c.is_whitespace() && !"()[],:\"*~!<>=\\".contains(c)
}

fn looks_like_number(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    digits(int)
        && frac.is_none_or(digits)
        && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

const KEYWORDS: [&str; 4] = ["AND", "OR", "NOT", "TO"];

/// A string as a bare word when that parses back to the same string, else quoted.
struct StrLit<'a>(&'a str);

impl Display for StrLit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let bare = !s.is_empty()
            && s.chars().all(is_bare_char)
            && !looks_like_number(s)
            && !matches!(s, "true" | "false")
            && !KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(s));
        if bare {
            return f.write_str(s);
        }
        f.write_char('"')?;
        for c in s.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\t' => f.write_str("\\t")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

struct Lit<'a>(&'a Value);

impl Display for Lit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Value::Bool(b) => write!(f, "{b}"),
            Value::I64(i) => write!(f, "{i}"),
            Value::U64(u) => write!(f, "{u}"),
            Value::F64(x) => write!(f, "{x:?}"),
            Value::Str(s) => StrLit(s).fmt(f),
            // Not valid in queries (validation refuses them); printed for diagnostics only.
            other => write!(f, "<{}>", other.kind()),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    /// NOTs and parentheses open at the cursor: the parser's recursion, bounded by
    /// [`MAX_DEPTH`](crate::MAX_DEPTH) so that no text can overflow the stack.
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, message: String) -> QueryError {
        QueryError::Syntax {
            position: self.pos,
            message,
        }
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.text.len() - trimmed.len();
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.pos += s.len();
            true
        } else {
            false
        }
    }

    fn describe_next(&self) -> String {
        match self.peek() {
            None => "the end of the query".to_owned(),
            Some(_) => {
                let word: String = self.rest().chars().take(12).collect();
                format!("{word:?}")
            }
        }
    }

    fn expect(&mut self, s: &str, what: &str) -> Result<()> {
        self.skip_ws();
        if self.eat(s) {
            Ok(())
        } else {
            Err(self.error(format!("expected {what}, found {}", self.describe_next())))
        }
    }

    /// The bare word at the cursor, without consuming it.
    fn peek_word(&self) -> &str {
        let rest = self.rest();
        let end = rest.find(|c: char| !is_bare_char(c)).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Consumes the keyword `kw` when it stands as a whole word at the cursor.
    fn eat_keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        if self.peek_word() == kw {
            // `NOT:x` is a field called NOT, not the operator.
            let after = self.rest()[kw.len()..].trim_start();
            if after.starts_with(':') {
                return false;
            }
            self.pos += kw.len();
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Filter> {
        let mut parts = vec![self.and_expr()?];
        while self.eat_keyword("OR") {
            parts.push(self.and_expr()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::Or(parts)
        })
    }

    fn and_expr(&mut self) -> Result<Filter> {
        let mut parts = vec![self.unary()?];
        while self.eat_keyword("AND") {
            parts.push(self.unary()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Filter::And(parts)
        })
    }

    /// Runs `f` one level deeper in the nesting of NOTs and groups.
    fn nested<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.depth >= crate::MAX_DEPTH {
            return Err(self.error(format!(
                "NOT and parentheses nest deeper than {} levels here",
                crate::MAX_DEPTH
            )));
        }
        self.depth += 1;
        let out = f(self);
        self.depth -= 1;
        out
    }

    fn unary(&mut self) -> Result<Filter> {
        self.skip_ws();
        if self.eat_keyword("NOT") {
            return self.nested(|p| Ok(Filter::Not(Box::new(p.unary()?))));
        }
        if self.eat("(") {
            return self.nested(|p| {
                let inner = p.expr()?;
                p.expect(")", "')' to close the group")?;
                Ok(inner)
            });
        }
        if self.eat("*") {
            return Ok(Filter::All);
        }
        let start = self.pos;
        let path = self.path()?;
        self.skip_ws();
        if self.peek() == Some('(') && matches!(path.as_str(), "exists" | "missing") {
            self.pos += 1;
            self.skip_ws();
            let field = self.path()?;
            self.expect(")", "')' after the field name")?;
            return Ok(if path == "exists" {
                Filter::Exists(field)
            } else {
                Filter::Missing(field)
            });
        }
        if !self.eat(":") {
            let found = self.describe_next();
            self.pos = start;
            return Err(self.error(format!(
                "expected field:value, exists(field) or missing(field), found {path:?} followed by {found}"
            )));
        }
        self.rhs(path)
    }

    fn path(&mut self) -> Result<String> {
        let rest = self.rest();
        let end = rest
            .find(|c: char| !(is_field_char(c) || c == '.'))
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(self.error(format!(
                "expected a field name, found {}",
                self.describe_next()
            )));
        }
        let path = rest[..end].to_owned();
        self.pos += end;
        Ok(path)
    }

    fn rhs(&mut self, field: String) -> Result<Filter> {
        self.skip_ws();
        for (op, make) in [
            (">=", Filter::Ge as fn(String, Value) -> Filter),
            ("<=", Filter::Le),
            ("!=", Filter::Ne),
            (">", Filter::Gt),
            ("<", Filter::Lt),
        ] {
            if self.eat(op) {
                let v = self.value()?;
                return Ok(make(field, v));
            }
        }
        if self.eat("~") {
            let words = self.string_value("the words to match after '~'")?;
            return Ok(Filter::Text(field, words));
        }
        if self.eat("[") {
            let low = self.value()?;
            self.skip_ws();
            if !self.eat_keyword("TO") {
                return Err(self.error(format!(
                    "expected TO in a range, found {}",
                    self.describe_next()
                )));
            }
            let high = self.value()?;
            self.expect("]", "']' to close the range")?;
            return Ok(Filter::Between(field, low, high));
        }
        if self.eat("(") {
            let mut values = vec![self.value()?];
            loop {
                self.skip_ws();
                if self.eat(",") {
                    values.push(self.value()?);
                } else if self.eat(")") {
                    return Ok(Filter::In(field, values));
                } else {
                    return Err(self.error(format!(
                        "expected ',' or ')' in a list of values, found {}",
                        self.describe_next()
                    )));
                }
            }
        }
        let (value, raw) = self.value_with_raw()?;
        if self.eat("*") {
            return Ok(Filter::Prefix(field, raw));
        }
        Ok(Filter::Eq(field, value))
    }

    fn value(&mut self) -> Result<Value> {
        self.value_with_raw().map(|(v, _)| v)
    }

    fn string_value(&mut self, what: &str) -> Result<String> {
        self.skip_ws();
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let word = self.peek_word();
        if word.is_empty() {
            return Err(self.error(format!("expected {what}, found {}", self.describe_next())));
        }
        let word = word.to_owned();
        self.pos += word.len();
        Ok(word)
    }

    /// A value and the text it was written as (for prefixes, where `12*` means the
    /// string "12").
    fn value_with_raw(&mut self) -> Result<(Value, String)> {
        self.skip_ws();
        if self.peek() == Some('"') {
            let s = self.quoted()?;
            return Ok((Value::Str(s.clone()), s));
        }
        let word = self.peek_word().to_owned();
        if word.is_empty() {
            return Err(self.error(format!("expected a value, found {}", self.describe_next())));
        }
        let value = match word.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            w if looks_like_number(w) => parse_number(w)
                .ok_or_else(|| self.error(format!("{w:?} is not a usable number")))?,
            w => Value::Str(w.to_owned()),
        };
        self.pos += word.len();
        Ok((value, word))
    }

    fn quoted(&mut self) -> Result<String> {
        let start = self.pos;
        self.pos += 1; // the opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                self.pos = start;
                return Err(self.error("unterminated string: missing the closing '\"'".to_owned()));
            };
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let esc_at = self.pos - 1;
                    let Some(e) = self.peek() else {
                        self.pos = start;
                        return Err(
                            self.error("unterminated string: missing the closing '\"'".to_owned())
                        );
                    };
                    self.pos += e.len_utf8();
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' => out.push(self.unicode_escape(esc_at)?),
                        other => {
                            self.pos = esc_at;
                            return Err(self.error(format!("unknown escape '\\{other}'")));
                        }
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn unicode_escape(&mut self, esc_at: usize) -> Result<char> {
        let bad = |p: &mut Self| {
            p.pos = esc_at;
            Err(p.error("bad unicode escape: write \\u{hex}".to_owned()))
        };
        if !self.eat("{") {
            return bad(self);
        }
        let rest = self.rest();
        let Some(end) = rest.find('}') else {
            return bad(self);
        };
        let hex = &rest[..end];
        match u32::from_str_radix(hex, 16).ok().and_then(char::from_u32) {
            Some(c) if !hex.is_empty() && hex.len() <= 6 => {
                self.pos += end + 1;
                Ok(c)
            }
            _ => bad(self),
        }
    }
}

fn parse_number(w: &str) -> Option<Value> {
    let is_float = w.contains(['.', 'e', 'E']);
    if !is_float {
        if let Ok(i) = w.parse::<i64>() {
            return Some(Value::I64(i));
        }
        if let Ok(u) = w.trim_start_matches('+').parse::<u64>() {
            return Some(Value::U64(u));
        }
    }
    let f: f64 = w.parse().ok()?;
    f.is_finite().then_some(Value::F64(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Query> {
        Query::parse("Order", s)
    }

    #[test]
    fn parses_the_documented_examples() {
        let q = parse("status:ReadyToShip AND amount:>100").unwrap();
        assert_eq!(
            q,
            Query::for_type("Order")
                .eq("status", "ReadyToShip")
                .gt("amount", 100)
        );
        let q = parse("(region:eu OR region:us) AND NOT status:Held").unwrap();
        assert_eq!(
            q.filter(),
            &Filter::And(vec![
                Filter::Or(vec![Filter::eq("region", "eu"), Filter::eq("region", "us")]),
                Filter::not(Filter::eq("status", "Held")),
            ])
        );
        assert_eq!(
            parse("amount:[10 TO 20.5]").unwrap().filter(),
            &Filter::between("amount", 10, 20.5)
        );
        assert_eq!(
            parse("status:(New, \"On hold\")").unwrap().filter(),
            &Filter::is_in("status", ["New", "On hold"])
        );
        assert_eq!(
            parse("name:Ab*").unwrap().filter(),
            &Filter::prefix("name", "Ab")
        );
        assert_eq!(
            parse("code:12*").unwrap().filter(),
            &Filter::prefix("code", "12")
        );
        assert_eq!(
            parse("body:~\"quick fox\"").unwrap().filter(),
            &Filter::text("body", "quick fox")
        );
        assert_eq!(
            parse("exists(note) AND missing(a.b)").unwrap().filter(),
            &Filter::exists("note").and(Filter::missing("a.b"))
        );
        assert_eq!(parse("*").unwrap().filter(), &Filter::All);
        assert_eq!(parse("   ").unwrap().filter(), &Filter::All);
        assert_eq!(
            parse("flag:true AND n:-3 AND x:1e3 AND d:2024-05-01")
                .unwrap()
                .filter(),
            &Filter::And(vec![
                Filter::eq("flag", true),
                Filter::eq("n", -3),
                Filter::eq("x", 1000.0),
                Filter::eq("d", "2024-05-01")
            ])
        );
        assert_eq!(parse("NOT:x").unwrap().filter(), &Filter::eq("NOT", "x"));
        assert_eq!(
            parse("big:18446744073709551615").unwrap().filter(),
            &Filter::eq("big", u64::MAX)
        );
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let q = parse("a:1 OR b:2 AND NOT c:3").unwrap();
        assert_eq!(
            q.filter(),
            &Filter::Or(vec![
                Filter::eq("a", 1),
                Filter::And(vec![Filter::eq("b", 2), Filter::not(Filter::eq("c", 3))]),
            ])
        );
    }

    #[test]
    fn errors_point_at_the_problem() {
        let cases = [
            ("status:", 7, "expected a value"),
            ("status:Ready AND", 16, "expected a field name"),
            ("status Ready", 0, "expected field:value"),
            ("a:1 b:2", 4, "expected AND, OR"),
            ("a:1 and b:2", 4, "expected AND, OR"),
            ("(a:1", 4, "')' to close"),
            ("a:[1 2]", 5, "expected TO"),
            ("a:\"abc", 2, "unterminated string"),
            ("a:\"x\\q\"", 4, "unknown escape"),
            ("a:(1 2)", 5, "expected ',' or ')'"),
            ("a:\"\\u{zz}\"", 3, "bad unicode escape"),
        ];
        for (text, position, message) in cases {
            match parse(text) {
                Err(QueryError::Syntax {
                    position: p,
                    message: m,
                }) => {
                    assert_eq!(p, position, "{text}: {m}");
                    assert!(m.contains(message), "{text}: {m}");
                }
                other => panic!("{text}: expected a syntax error, got {other:?}"),
            }
        }
        assert!(matches!(
            parse("a:[5 TO 1]"),
            Err(QueryError::BadRange { .. })
        ));
        assert!(matches!(
            parse("body:~\",,\""),
            Err(QueryError::NoWords { .. })
        ));
    }

    #[test]
    fn printing_quotes_what_would_not_read_back() {
        let q = Query::for_type("T")
            .eq("s", "two words")
            .eq("n", "42")
            .eq("k", "AND")
            .eq("b", "true")
            .eq("e", "")
            .eq("q", "say \"hi\"\n")
            .eq("f", 1.0);
        let text = q.to_string();
        assert_eq!(
            text,
            r#"s:"two words" AND n:"42" AND k:"AND" AND b:"true" AND e:"" AND q:"say \"hi\"\n" AND f:1.0"#
        );
        assert_eq!(Query::parse("T", &text).unwrap(), q);
    }
}
