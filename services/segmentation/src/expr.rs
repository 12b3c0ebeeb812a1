//! The segment expression language: boolean predicates over member features.
//!
//! ```text
//! expr    := or
//! or      := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | compare
//! compare := sum [("=" | "!=" | "<" | "<=" | ">" | ">=") sum | "between" sum "and" sum]
//! sum     := atom (("+" | "-") atom)*
//! atom    := number | duration | string | date | "now" | "true" | "false"
//!          | feature | function "(" string ")" | "days_since" "(" sum ")" | "(" expr ")"
//! ```
//!
//! Values are typed: numbers (exact decimals), times, durations (`30d`), strings and booleans.
//! A time plus or minus a duration is a time; `days_since(t)` is a number. A feature that has
//! no value (no purchase yet, no birthday) is *absent*: arithmetic on it is absent and every
//! comparison with it is false, so `not` of such a comparison is true. The whole expression is
//! type-checked when parsed; errors carry the 1-based column they were found at.
//! `docs/segments.md` lists every feature and function.

use std::fmt;

use loyalty_platform::clock::{DAY_MS, Millis};
use rust_decimal::Decimal;

use crate::calendar;
use crate::features::Features;

/// Longest expression accepted, in characters.
pub const MAX_LEN: usize = 4096;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 32;
/// Most nodes in one expression.
pub const MAX_NODES: usize = 512;
/// Longest duration literal, in days (about 100 years).
pub const MAX_DURATION_DAYS: i64 = 36_600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// 1-based column (in characters) where the problem is.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for ExprError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Bool,
    Number,
    Time,
    Duration,
    Str,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Bool => "a boolean",
            Type::Number => "a number",
            Type::Time => "a time",
            Type::Duration => "a duration",
            Type::Str => "a string",
        })
    }
}

/// The features an expression can name, with their types.
pub const FEATURES: &[(&str, Type)] = &[
    ("purchase_count_30d", Type::Number),
    ("purchase_count_90d", Type::Number),
    ("purchase_count_365d", Type::Number),
    ("purchase_count_prev_year", Type::Number),
    ("purchase_count_total", Type::Number),
    ("spend_30d", Type::Number),
    ("spend_90d", Type::Number),
    ("spend_365d", Type::Number),
    ("spend_prev_year", Type::Number),
    ("spend_total", Type::Number),
    ("average_check", Type::Number),
    ("points_balance", Type::Number),
    ("points_total", Type::Number),
    ("days_to_birthday", Type::Number),
    ("first_purchase", Type::Time),
    ("last_purchase", Type::Time),
    ("registered_at", Type::Time),
    ("has_purchased", Type::Bool),
    ("contactable", Type::Bool),
    ("contactable_sms", Type::Bool),
    ("contactable_email", Type::Bool),
    ("contactable_push", Type::Bool),
    ("contactable_messenger", Type::Bool),
    ("questionnaire_complete", Type::Bool),
    ("referred", Type::Bool),
    ("tier", Type::Str),
];

/// Functions of one string argument (a category, brand or store id).
pub const FUNCTIONS: &[(&str, Type)] = &[
    ("category_first", Type::Time),
    ("category_last", Type::Time),
    ("category_spend", Type::Number),
    ("bought_category", Type::Bool),
    ("only_category", Type::Bool),
    ("brand_first", Type::Time),
    ("brand_last", Type::Time),
    ("brand_spend", Type::Number),
    ("bought_brand", Type::Bool),
    ("only_brand", Type::Bool),
    ("store_first", Type::Time),
    ("store_last", Type::Time),
    ("store_spend", Type::Number),
    ("bought_store", Type::Bool),
    ("only_store", Type::Bool),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Compare(Box<Expr>, Cmp, Box<Expr>),
    Between(Box<Expr>, Box<Expr>, Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Number(Decimal),
    Duration(i64),
    Str(String),
    Time(Millis),
    Now,
    Bool(bool),
    Feature(&'static str),
    Function(&'static str, String),
    DaysSince(Box<Expr>),
}

/// A parsed, type-checked expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    node: Node,
    ty: Type,
    /// Character range in the source.
    span: (usize, usize),
}

/// A value during evaluation; `Absent` propagates through arithmetic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Bool(bool),
    Number(Decimal),
    Time(Millis),
    Duration(i64),
    Str(String),
    Absent,
}

/// One leaf condition of an explanation, with its source text and result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clause {
    pub text: String,
    pub holds: bool,
    /// The values compared, as text (`spend_365d = 1520.00`).
    pub values: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// Lexing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Number(Decimal),
    Duration(i64),
    Str(String),
    Date(Millis),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

fn err(column0: usize, message: impl Into<String>) -> ExprError {
    ExprError {
        column: column0 + 1,
        message: message.into(),
    }
}

fn lex(src: &[char]) -> Result<Vec<Token>, ExprError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let tok = if c.is_ascii_alphabetic() || c == '_' {
            while i < src.len() && (src[i].is_ascii_alphanumeric() || src[i] == '_') {
                i += 1;
            }
            Tok::Ident(src[start..i].iter().collect())
        } else if c.is_ascii_digit() {
            // A date is exactly YYYY-MM-DD; anything else with '-' is a subtraction (1000-30).
            let is_date = src.len() >= i + 10
                && src[i..i + 10].iter().enumerate().all(|(k, ch)| {
                    if k == 4 || k == 7 {
                        *ch == '-'
                    } else {
                        ch.is_ascii_digit()
                    }
                })
                && src
                    .get(i + 10)
                    .is_none_or(|ch| !(ch.is_ascii_alphanumeric() || *ch == '_' || *ch == '.'));
            if is_date {
                i += 10;
            } else {
                while i < src.len() && (src[i].is_ascii_digit() || src[i] == '.') {
                    i += 1;
                }
            }
            let text: String = src[start..i].iter().collect();
            if text.contains('-') {
                Tok::Date(parse_date(&text).ok_or_else(|| {
                    err(start, format!("{text:?} is not a date (write YYYY-MM-DD)"))
                })?)
            } else if i < src.len() && (src[i] == 'd' || src[i] == 'D') && !text.contains('.') {
                i += 1;
                if i < src.len() && (src[i].is_ascii_alphanumeric() || src[i] == '_') {
                    return Err(err(start, "a duration is a whole number of days, like 30d"));
                }
                let days: i64 = text
                    .parse()
                    .ok()
                    .filter(|d| *d <= MAX_DURATION_DAYS)
                    .ok_or_else(|| {
                        err(start, format!("durations are at most {MAX_DURATION_DAYS}d"))
                    })?;
                Tok::Duration(days)
            } else {
                if i < src.len() && (src[i].is_ascii_alphabetic() || src[i] == '_') {
                    return Err(err(
                        i,
                        "unexpected letter after a number (durations are written 30d)",
                    ));
                }
                let n: Decimal = text
                    .parse()
                    .map_err(|_| err(start, format!("{text:?} is not a number")))?;
                Tok::Number(n)
            }
        } else if c == '"' || c == '\'' {
            i += 1;
            let mut s = String::new();
            loop {
                match src.get(i) {
                    None => return Err(err(start, "unterminated string")),
                    Some(&q) if q == c => {
                        i += 1;
                        break;
                    }
                    Some('\\') if matches!(src.get(i + 1), Some(&n) if n == c || n == '\\') => {
                        s.push(src[i + 1]);
                        i += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        i += 1;
                    }
                }
            }
            Tok::Str(s)
        } else {
            let two: String = src[i..(i + 2).min(src.len())].iter().collect();
            let (op, len) = match (c, two.as_str()) {
                (_, "<=") => (Tok::Op("<="), 2),
                (_, ">=") => (Tok::Op(">="), 2),
                (_, "!=") => (Tok::Op("!="), 2),
                (_, "==") => (Tok::Op("="), 2),
                ('=', _) => (Tok::Op("="), 1),
                ('<', _) => (Tok::Op("<"), 1),
                ('>', _) => (Tok::Op(">"), 1),
                ('+', _) => (Tok::Op("+"), 1),
                ('-', _) => (Tok::Op("-"), 1),
                ('(', _) => (Tok::LParen, 1),
                (')', _) => (Tok::RParen, 1),
                (',', _) => (Tok::Comma, 1),
                _ => return Err(err(start, format!("unexpected character {c:?}"))),
            };
            i += len;
            op
        };
        out.push(Token { tok, start, end: i });
    }
    out.push(Token {
        tok: Tok::End,
        start: src.len(),
        end: src.len(),
    });
    Ok(out)
}

fn parse_date(text: &str) -> Option<Millis> {
    let mut parts = text.split('-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let day = calendar::day_from_civil(y, m, d);
    // Refuse dates that roll over (2023-02-30).
    (calendar::civil(day) == (y, m, d)).then_some(day * DAY_MS)
}

// ---------------------------------------------------------------------------------------
// Parsing

struct Parser<'a> {
    toks: Vec<Token>,
    pos: usize,
    src: &'a [char],
    nodes: usize,
    depth: usize,
}

const KEYWORDS: &[&str] = &["and", "or", "not", "between", "now", "true", "false"];

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if w.eq_ignore_ascii_case(word))
    }

    fn is_op(&self, op: &str) -> bool {
        matches!(&self.peek().tok, Tok::Op(o) if *o == op)
    }

    fn make(&mut self, node: Node, ty: Type, span: (usize, usize)) -> Result<Expr, ExprError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(err(
                span.0,
                format!("the expression has more than {MAX_NODES} parts"),
            ));
        }
        Ok(Expr { node, ty, span })
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(err(
                self.peek().start,
                format!("nesting deeper than {MAX_DEPTH}"),
            ));
        }
        Ok(())
    }

    fn expect_bool(&self, e: &Expr, role: &str) -> Result<(), ExprError> {
        if e.ty == Type::Bool {
            Ok(())
        } else {
            Err(err(
                e.span.0,
                format!("{role} must be a condition, found {}", e.ty),
            ))
        }
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        self.enter()?;
        let first = self.and()?;
        if !self.is_word("or") {
            self.depth -= 1;
            return Ok(first);
        }
        self.expect_bool(&first, "each side of `or`")?;
        let start = first.span.0;
        let mut parts = vec![first];
        while self.is_word("or") {
            self.next();
            let e = self.and()?;
            self.expect_bool(&e, "each side of `or`")?;
            parts.push(e);
        }
        let end = parts.last().map_or(start, |e| e.span.1);
        self.depth -= 1;
        self.make(Node::Or(parts), Type::Bool, (start, end))
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let first = self.unary()?;
        if !self.is_word("and") {
            return Ok(first);
        }
        self.expect_bool(&first, "each side of `and`")?;
        let start = first.span.0;
        let mut parts = vec![first];
        while self.is_word("and") {
            self.next();
            let e = self.unary()?;
            self.expect_bool(&e, "each side of `and`")?;
            parts.push(e);
        }
        let end = parts.last().map_or(start, |e| e.span.1);
        self.make(Node::And(parts), Type::Bool, (start, end))
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.is_word("not") {
            let t = self.next();
            self.enter()?;
            let e = self.unary()?;
            self.depth -= 1;
            self.expect_bool(&e, "what `not` negates")?;
            let end = e.span.1;
            return self.make(Node::Not(Box::new(e)), Type::Bool, (t.start, end));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, ExprError> {
        let left = self.sum()?;
        if self.is_word("between") {
            self.next();
            let low = self.sum()?;
            if !self.is_word("and") {
                return Err(err(
                    self.peek().start,
                    "expected `and` in `between … and …`",
                ));
            }
            self.next();
            let high = self.sum()?;
            for bound in [&low, &high] {
                comparable(&left, bound)?;
                ordered(&left)?;
            }
            let span = (left.span.0, high.span.1);
            return self.make(
                Node::Between(Box::new(left), Box::new(low), Box::new(high)),
                Type::Bool,
                span,
            );
        }
        let op = match &self.peek().tok {
            Tok::Op("=") => Cmp::Eq,
            Tok::Op("!=") => Cmp::Ne,
            Tok::Op("<") => Cmp::Lt,
            Tok::Op("<=") => Cmp::Le,
            Tok::Op(">") => Cmp::Gt,
            Tok::Op(">=") => Cmp::Ge,
            _ => return Ok(left),
        };
        self.next();
        let right = self.sum()?;
        comparable(&left, &right)?;
        if !matches!(op, Cmp::Eq | Cmp::Ne) {
            ordered(&left)?;
        }
        let span = (left.span.0, right.span.1);
        self.make(
            Node::Compare(Box::new(left), op, Box::new(right)),
            Type::Bool,
            span,
        )
    }

    fn sum(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.atom()?;
        loop {
            let plus = self.is_op("+");
            if !plus && !self.is_op("-") {
                return Ok(left);
            }
            let op = self.next();
            let right = self.atom()?;
            let ty = match (left.ty, right.ty) {
                (Type::Number, Type::Number) => Type::Number,
                (Type::Time, Type::Duration) => Type::Time,
                (Type::Duration, Type::Time) if plus => Type::Time,
                (Type::Duration, Type::Duration) => Type::Duration,
                (l, r) => {
                    return Err(err(
                        op.start,
                        format!(
                            "cannot {} {r} {} {l}",
                            if plus { "add" } else { "subtract" },
                            if plus { "to" } else { "from" }
                        ),
                    ));
                }
            };
            let span = (left.span.0, right.span.1);
            let node = if plus {
                Node::Add(Box::new(left), Box::new(right))
            } else {
                Node::Sub(Box::new(left), Box::new(right))
            };
            left = self.make(node, ty, span)?;
        }
    }

    fn atom(&mut self) -> Result<Expr, ExprError> {
        let t = self.next();
        let span = (t.start, t.end);
        match t.tok {
            Tok::Number(n) => self.make(Node::Number(n), Type::Number, span),
            Tok::Duration(d) => self.make(Node::Duration(d), Type::Duration, span),
            Tok::Str(s) => self.make(Node::Str(s), Type::Str, span),
            Tok::Date(ms) => self.make(Node::Time(ms), Type::Time, span),
            Tok::LParen => {
                self.enter()?;
                let inner = self.or()?;
                self.depth -= 1;
                let close = self.next();
                if close.tok != Tok::RParen {
                    return Err(err(close.start, "expected `)`"));
                }
                Ok(Expr {
                    span: (t.start, close.end),
                    ..inner
                })
            }
            Tok::Ident(word) => self.word(&word, span),
            Tok::End => Err(err(
                t.start,
                "the expression ends where a value was expected",
            )),
            Tok::RParen | Tok::Comma | Tok::Op(_) => Err(err(
                t.start,
                format!("expected a value, found `{}`", self.text(span)),
            )),
        }
    }

    fn word(&mut self, word: &str, span: (usize, usize)) -> Result<Expr, ExprError> {
        let lower = word.to_ascii_lowercase();
        match lower.as_str() {
            "now" => return self.make(Node::Now, Type::Time, span),
            "true" => return self.make(Node::Bool(true), Type::Bool, span),
            "false" => return self.make(Node::Bool(false), Type::Bool, span),
            "days_since" => {
                self.open_paren(word)?;
                let arg = self.sum()?;
                if arg.ty != Type::Time {
                    return Err(err(
                        arg.span.0,
                        format!("days_since takes a time, found {}", arg.ty),
                    ));
                }
                let end = self.close_paren()?;
                return self.make(Node::DaysSince(Box::new(arg)), Type::Number, (span.0, end));
            }
            k if KEYWORDS.contains(&k) => {
                return Err(err(span.0, format!("`{word}` cannot stand here")));
            }
            _ => {}
        }
        if let Some((name, ty)) = FEATURES.iter().find(|(n, _)| *n == lower) {
            if matches!(self.peek().tok, Tok::LParen) {
                return Err(err(
                    self.peek().start,
                    format!("{name} is a feature, not a function"),
                ));
            }
            return self.make(Node::Feature(name), *ty, span);
        }
        if let Some((name, ty)) = FUNCTIONS.iter().find(|(n, _)| *n == lower) {
            self.open_paren(word)?;
            let arg = self.next();
            let Tok::Str(value) = arg.tok else {
                return Err(err(
                    arg.start,
                    format!("{name} takes one string, like {name}(\"boots\")"),
                ));
            };
            let end = self.close_paren()?;
            return self.make(Node::Function(name, value), *ty, (span.0, end));
        }
        Err(err(
            span.0,
            format!("unknown feature or function `{word}`{}", suggest(&lower)),
        ))
    }

    fn open_paren(&mut self, name: &str) -> Result<(), ExprError> {
        let t = self.next();
        if t.tok != Tok::LParen {
            return Err(err(t.start, format!("expected `(` after {name}")));
        }
        Ok(())
    }

    fn close_paren(&mut self) -> Result<usize, ExprError> {
        let t = self.next();
        if t.tok != Tok::RParen {
            return Err(err(t.start, "expected `)` (functions take one argument)"));
        }
        Ok(t.end)
    }

    fn text(&self, span: (usize, usize)) -> String {
        self.src[span.0..span.1.min(self.src.len())]
            .iter()
            .collect()
    }
}

fn suggest(word: &str) -> String {
    let best = FEATURES
        .iter()
        .map(|(n, _)| *n)
        .chain(FUNCTIONS.iter().map(|(n, _)| *n))
        .filter(|n| n.starts_with(word.split('_').next().unwrap_or(word)))
        .take(3)
        .collect::<Vec<_>>();
    if best.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", best.join(", "))
    }
}

fn comparable(left: &Expr, right: &Expr) -> Result<(), ExprError> {
    if left.ty == right.ty {
        Ok(())
    } else {
        Err(err(
            right.span.0,
            format!("cannot compare {} with {}", left.ty, right.ty),
        ))
    }
}

fn ordered(e: &Expr) -> Result<(), ExprError> {
    match e.ty {
        Type::Number | Type::Time | Type::Duration => Ok(()),
        ty => Err(err(e.span.0, format!("{ty} has no order; use = or !="))),
    }
}

/// Parses and type-checks an expression, which must be a condition.
pub fn parse(source: &str) -> Result<Expr, ExprError> {
    let chars: Vec<char> = source.chars().collect();
    if chars.len() > MAX_LEN {
        return Err(err(
            MAX_LEN,
            format!("expressions are at most {MAX_LEN} characters"),
        ));
    }
    if chars.iter().all(|c| c.is_whitespace()) {
        return Err(err(0, "the expression is empty"));
    }
    if let Some(at) = chars
        .iter()
        .position(|c| c.is_control() && !c.is_whitespace())
    {
        return Err(err(at, "control characters are not allowed"));
    }
    let toks = lex(&chars)?;
    let mut p = Parser {
        toks,
        pos: 0,
        src: &chars,
        nodes: 0,
        depth: 0,
    };
    let e = p.or()?;
    let rest = p.peek().clone();
    if rest.tok != Tok::End {
        return Err(err(
            rest.start,
            format!(
                "unexpected `{}` (a missing `and` or `or`?)",
                p.text((rest.start, rest.end))
            ),
        ));
    }
    if e.ty != Type::Bool {
        return Err(err(
            0,
            format!("a segment must be a condition, this is {}", e.ty),
        ));
    }
    Ok(e)
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// What evaluation reads besides the features.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    pub now: Millis,
}

fn number(n: i64) -> Value {
    Value::Number(Decimal::from(n))
}

fn time(t: Option<Millis>) -> Value {
    t.map_or(Value::Absent, Value::Time)
}

fn feature(name: &str, f: &Features, cx: Context) -> Value {
    let c = &f.member.consents;
    match name {
        "purchase_count_30d" => number(f.window(30, cx.now).count),
        "purchase_count_90d" => number(f.window(90, cx.now).count),
        "purchase_count_365d" => number(f.window(365, cx.now).count),
        "purchase_count_prev_year" => number(f.previous_year(cx.now).count),
        "purchase_count_total" => number(f.total.count),
        "spend_30d" => Value::Number(f.window(30, cx.now).spend),
        "spend_90d" => Value::Number(f.window(90, cx.now).spend),
        "spend_365d" => Value::Number(f.window(365, cx.now).spend),
        "spend_prev_year" => Value::Number(f.previous_year(cx.now).spend),
        "spend_total" => Value::Number(f.total.spend),
        "average_check" => Value::Number(f.average_check()),
        "points_balance" => number(f.points_balance),
        "points_total" => {
            if f.ledger.sequence > 0 {
                number(f.ledger.total)
            } else {
                Value::Absent
            }
        }
        "days_to_birthday" => f.member.birthday.map_or(Value::Absent, |(m, d, _)| {
            number(calendar::days_until_anniversary(
                calendar::day_of(cx.now),
                m,
                d,
            ))
        }),
        "first_purchase" => time(f.first_purchase),
        "last_purchase" => time(f.last_purchase),
        "registered_at" => time(f.member.registered_at),
        "has_purchased" => Value::Bool(f.total.count > 0),
        "contactable" => Value::Bool(c.any()),
        "contactable_sms" => Value::Bool(c.sms),
        "contactable_email" => Value::Bool(c.email),
        "contactable_push" => Value::Bool(c.push),
        "contactable_messenger" => Value::Bool(c.messenger),
        "questionnaire_complete" => Value::Bool(f.member.questionnaire_complete),
        "referred" => Value::Bool(f.member.referred),
        "tier" => Value::Str(f.member.tier_id.clone()),
        _ => Value::Absent,
    }
}

fn function(name: &str, arg: &str, f: &Features) -> Value {
    let (kind, what) = name.split_once('_').unwrap_or((name, ""));
    let (map, what) = match (kind, what) {
        ("bought" | "only", k) => (k, kind),
        (k, w) => (k, w),
    };
    let map = match map {
        "category" => &f.categories,
        "brand" => &f.brands,
        _ => &f.stores,
    };
    let found = map.get(arg);
    match what {
        "first" => time(found.map(|a| a.first)),
        "last" => time(found.map(|a| a.last)),
        "spend" => Value::Number(found.map_or(Decimal::ZERO, |a| a.spend)),
        "bought" => Value::Bool(found.is_some_and(|a| a.receipts > 0)),
        // Bought it, and nothing else that still counts.
        _ => Value::Bool(
            found.is_some_and(|a| a.receipts > 0)
                && map.iter().all(|(k, a)| k == arg || a.receipts <= 0),
        ),
    }
}

impl Expr {
    /// Whether the features satisfy the expression at `cx.now`.
    pub fn matches(&self, f: &Features, cx: Context) -> bool {
        self.eval(f, cx) == Value::Bool(true)
    }

    fn eval(&self, f: &Features, cx: Context) -> Value {
        match &self.node {
            Node::Or(parts) => Value::Bool(parts.iter().any(|p| p.matches(f, cx))),
            Node::And(parts) => Value::Bool(parts.iter().all(|p| p.matches(f, cx))),
            Node::Not(e) => Value::Bool(!e.matches(f, cx)),
            Node::Compare(l, op, r) => Value::Bool(compare(&l.eval(f, cx), *op, &r.eval(f, cx))),
            Node::Between(x, lo, hi) => {
                let x = x.eval(f, cx);
                Value::Bool(
                    compare(&x, Cmp::Ge, &lo.eval(f, cx)) && compare(&x, Cmp::Le, &hi.eval(f, cx)),
                )
            }
            Node::Add(l, r) => arith(l.eval(f, cx), r.eval(f, cx), true),
            Node::Sub(l, r) => arith(l.eval(f, cx), r.eval(f, cx), false),
            Node::Number(n) => Value::Number(*n),
            Node::Duration(d) => Value::Duration(*d),
            Node::Str(s) => Value::Str(s.clone()),
            Node::Time(t) => Value::Time(*t),
            Node::Now => Value::Time(cx.now),
            Node::Bool(b) => Value::Bool(*b),
            Node::Feature(name) => feature(name, f, cx),
            Node::Function(name, arg) => function(name, arg, f),
            Node::DaysSince(t) => match t.eval(f, cx) {
                Value::Time(t) => number(Features::days_since(t, cx.now)),
                _ => Value::Absent,
            },
        }
    }

    /// The leaf conditions with their results and the values they compared, so an admin
    /// sees why a member is or is not in a segment.
    pub fn explain(&self, source: &str, f: &Features, cx: Context) -> Vec<Clause> {
        let chars: Vec<char> = source.chars().collect();
        let mut out = Vec::new();
        self.explain_into(&chars, f, cx, &mut out);
        out
    }

    fn explain_into(&self, src: &[char], f: &Features, cx: Context, out: &mut Vec<Clause>) {
        match &self.node {
            Node::Or(parts) | Node::And(parts) => {
                for p in parts {
                    p.explain_into(src, f, cx, out);
                }
            }
            Node::Not(e) if matches!(e.node, Node::Or(_) | Node::And(_) | Node::Not(_)) => {
                e.explain_into(src, f, cx, out);
            }
            _ => {
                let mut values = Vec::new();
                self.collect_values(src, f, cx, &mut values);
                out.push(Clause {
                    text: src[self.span.0..self.span.1.min(src.len())]
                        .iter()
                        .collect(),
                    holds: self.matches(f, cx),
                    values,
                });
            }
        }
    }

    fn collect_values(&self, src: &[char], f: &Features, cx: Context, out: &mut Vec<String>) {
        match &self.node {
            Node::Feature(_) | Node::Function(..) | Node::DaysSince(_) | Node::Now => {
                let text: String = src[self.span.0..self.span.1.min(src.len())]
                    .iter()
                    .collect();
                out.push(format!("{text} = {}", show(&self.eval(f, cx))));
            }
            Node::Not(e) => e.collect_values(src, f, cx, out),
            Node::Compare(l, _, r) | Node::Add(l, r) | Node::Sub(l, r) => {
                l.collect_values(src, f, cx, out);
                r.collect_values(src, f, cx, out);
            }
            Node::Between(x, lo, hi) => {
                x.collect_values(src, f, cx, out);
                lo.collect_values(src, f, cx, out);
                hi.collect_values(src, f, cx, out);
            }
            _ => {}
        }
    }

    /// Whether the expression reads the feature `name`.
    pub fn reads_feature(&self, name: &str) -> bool {
        match &self.node {
            Node::Or(p) | Node::And(p) => p.iter().any(|e| e.reads_feature(name)),
            Node::Not(e) | Node::DaysSince(e) => e.reads_feature(name),
            Node::Compare(l, _, r) | Node::Add(l, r) | Node::Sub(l, r) => {
                l.reads_feature(name) || r.reads_feature(name)
            }
            Node::Between(x, lo, hi) => {
                x.reads_feature(name) || lo.reads_feature(name) || hi.reads_feature(name)
            }
            Node::Feature(f) => *f == name,
            _ => false,
        }
    }

    /// Whether the result can change with time alone (no event): such segments are
    /// re-evaluated on a schedule.
    pub fn depends_on_time(&self) -> bool {
        match &self.node {
            Node::Or(p) | Node::And(p) => p.iter().any(Expr::depends_on_time),
            Node::Not(e) => e.depends_on_time(),
            Node::DaysSince(_) => true,
            Node::Compare(l, _, r) | Node::Add(l, r) | Node::Sub(l, r) => {
                l.depends_on_time() || r.depends_on_time()
            }
            Node::Between(x, lo, hi) => {
                x.depends_on_time() || lo.depends_on_time() || hi.depends_on_time()
            }
            Node::Now => true,
            Node::Feature(name) => {
                name.contains("_30d")
                    || name.contains("_90d")
                    || name.contains("_365d")
                    || name.contains("prev_year")
                    || *name == "days_to_birthday"
            }
            _ => false,
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.normalize().to_string(),
        Value::Time(t) => {
            let (y, m, d) = calendar::civil(calendar::day_of(*t));
            format!("{y:04}-{m:02}-{d:02}")
        }
        Value::Duration(d) => format!("{d}d"),
        Value::Str(s) => format!("{s:?}"),
        Value::Absent => "absent".into(),
    }
}

fn arith(l: Value, r: Value, plus: bool) -> Value {
    let sign = if plus { 1 } else { -1 };
    match (l, r) {
        // Checked: a predicate such as `79228162514264337593543950335 + 1 > 0` must not panic
        // the consumer; an overflow is absent, so every comparison with it is false.
        (Value::Number(a), Value::Number(b)) => {
            let sum = if plus {
                a.checked_add(b)
            } else {
                a.checked_sub(b)
            };
            sum.map_or(Value::Absent, Value::Number)
        }
        (Value::Time(t), Value::Duration(d)) => {
            Value::Time(t.saturating_add((sign * d).saturating_mul(DAY_MS)))
        }
        (Value::Duration(d), Value::Time(t)) => {
            Value::Time(t.saturating_add(d.saturating_mul(DAY_MS)))
        }
        (Value::Duration(a), Value::Duration(b)) => Value::Duration(a.saturating_add(sign * b)),
        _ => Value::Absent,
    }
}

fn compare(l: &Value, op: Cmp, r: &Value) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (l, r) {
        (Value::Number(a), Value::Number(b)) => Some(a.cmp(b)),
        (Value::Time(a), Value::Time(b)) => Some(a.cmp(b)),
        (Value::Duration(a), Value::Duration(b)) => Some(a.cmp(b)),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        (Value::Str(a), Value::Str(b)) => Some(a.cmp(b)),
        _ => None,
    };
    let Some(ord) = ord else { return false };
    match op {
        Cmp::Eq => ord == Ordering::Equal,
        Cmp::Ne => ord != Ordering::Equal,
        Cmp::Lt => ord == Ordering::Less,
        Cmp::Le => ord != Ordering::Greater,
        Cmp::Gt => ord == Ordering::Greater,
        Cmp::Ge => ord != Ordering::Less,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{PurchaseFacts, RefundFacts};

    /// 2025-06-15T12:00Z.
    fn now() -> Millis {
        calendar::day_from_civil(2025, 6, 15) * DAY_MS + 12 * 3_600_000
    }

    fn days_ago(d: i64) -> Millis {
        now() - d * DAY_MS
    }

    fn bought(f: &mut Features, days: i64, paid: i64, category: &str, brand: &str) {
        f.apply_purchase(&PurchaseFacts {
            time: days_ago(days),
            store_id: "s1".into(),
            paid: Decimal::from(paid),
            lines: vec![(category.into(), brand.into(), Decimal::from(paid))],
            points_balance: None,
            tier_id: None,
        });
    }

    fn holds(source: &str, f: &Features) -> bool {
        parse(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .matches(f, Context { now: now() })
    }

    fn error(source: &str) -> ExprError {
        parse(source).expect_err(source)
    }

    #[test]
    fn comparisons_windows_and_logic() {
        let mut f = Features::default();
        bought(&mut f, 10, 700, "shoes", "x");
        bought(&mut f, 100, 500, "shoes", "x");
        f.member.consents.sms = true;
        assert!(holds("spend_365d > 1000 and contactable_sms", &f));
        assert!(holds("spend_365d >= 1200", &f));
        assert!(!holds("spend_365d > 1200", &f));
        assert!(holds(
            "purchase_count_30d = 1 and purchase_count_90d == 1",
            &f
        ));
        assert!(holds("purchase_count_total != 3", &f));
        assert!(holds("spend_30d < 701 or false", &f));
        assert!(holds("not contactable_email", &f));
        assert!(holds("not (contactable_email or contactable_push)", &f));
        assert!(holds("average_check = 600", &f));
        assert!(holds("has_purchased and contactable", &f));
        assert!(!holds("spend_30d + 1 > 701", &f));
        assert!(holds("spend_30d - 100 = 600", &f));
    }

    #[test]
    fn times_and_date_arithmetic() {
        let mut f = Features::default();
        bought(&mut f, 10, 100, "shoes", "x");
        assert!(holds("last_purchase > now - 30d", &f));
        assert!(!holds("last_purchase > now - 7d", &f));
        assert!(holds("days_since(last_purchase) = 10", &f));
        assert!(holds("first_purchase >= 2025-06-01", &f));
        assert!(holds("first_purchase < 2025-06-06", &f));
        assert!(holds("last_purchase between now - 11d and now - 9d", &f));
        // Nothing bought yet: every comparison with an absent time is false.
        let empty = Features::default();
        assert!(!holds("last_purchase < now", &empty));
        assert!(!holds("last_purchase >= now", &empty));
        assert!(holds("not (days_since(last_purchase) < 30)", &empty));
        assert!(!holds("has_purchased", &empty));
    }

    #[test]
    fn points_total_is_absent_until_a_ledger_entry_arrived() {
        assert!(
            parse("not (points_total < 5) or spend_30d > 1")
                .unwrap()
                .reads_feature("points_total")
        );
        assert!(
            !parse("points_balance > 5")
                .unwrap()
                .reads_feature("points_total")
        );
        let mut f = Features::default();
        assert!(!holds("points_total < 100", &f));
        assert!(!holds("points_total >= 0", &f));
        f.apply_ledger(&crate::features::LedgerPoints {
            sequence: 1,
            total: 0,
            at: days_ago(1),
        });
        assert!(holds("points_total < 100", &f));
        assert!(holds("points_total = 0", &f));
    }

    #[test]
    fn bought_category_between_and_not_since() {
        // "bought Boots between 700 and 760 days ago and not since".
        let rule = "days_since(category_last(\"boots\")) between 700 and 760";
        let mut cohort = Features::default();
        bought(&mut cohort, 730, 100, "boots", "x");
        bought(&mut cohort, 5, 100, "socks", "x");
        assert!(holds(rule, &cohort));
        let mut bought_again = cohort.clone();
        bought(&mut bought_again, 20, 100, "boots", "x");
        assert!(!holds(rule, &bought_again), "bought since");
        let mut too_old = Features::default();
        bought(&mut too_old, 800, 100, "boots", "x");
        assert!(!holds(rule, &too_old));
        assert!(holds(
            "bought_category('boots') and category_spend('boots') = 100",
            &too_old
        ));
        assert!(!holds("bought_category('sandals')", &too_old));
    }

    #[test]
    fn bought_only_one_brand() {
        let mut mono = Features::default();
        bought(&mut mono, 3, 100, "a", "yves");
        bought(&mut mono, 40, 100, "b", "yves");
        assert!(holds("only_brand(\"yves\")", &mono));
        assert!(!holds("only_brand(\"other\")", &mono));
        let mut mixed = mono.clone();
        bought(&mut mixed, 1, 10, "c", "other");
        assert!(!holds("only_brand(\"yves\")", &mixed));
        // A brand whose only receipt was refunded in full no longer counts.
        mixed.apply_refund(&RefundFacts {
            purchase_time: days_ago(1),
            store_id: "s1".into(),
            refunded: Decimal::from(10),
            lines: vec![("c".into(), "other".into(), Decimal::from(10))],
            receipt_fully_refunded: true,
            receipt_categories: vec!["c".into()],
            receipt_brands: vec!["other".into()],
        });
        assert!(holds("brand_spend(\"other\") = 0", &mixed));
        assert!(holds("only_brand(\"yves\")", &mixed));
        assert!(!holds("bought_brand(\"other\")", &mixed));
        assert!(!holds("bought_category('c')", &mixed));
        assert!(holds("bought_category('a')", &mixed));
        assert!(!holds("only_brand(\"nobody\")", &Features::default()));
    }

    #[test]
    fn birthdays_tiers_and_strings() {
        let mut f = Features::default();
        f.member.birthday = Some((6, 20, Some(1990)));
        f.member.tier_id = "gold".into();
        assert!(holds("days_to_birthday <= 7", &f));
        assert!(holds("days_to_birthday = 5", &f));
        assert!(holds("tier = \"gold\" and tier != 'silver'", &f));
        assert!(!holds("days_to_birthday < 3", &Features::default()));
    }

    #[test]
    fn syntax_errors_carry_their_column() {
        let e = error("spend_30d > ");
        assert_eq!(e.column, 13, "{e}");
        let e = error("spend_30d >> 5");
        assert_eq!(e.column, 12, "{e}");
        let e = error("(spend_30d > 5");
        assert_eq!(e.column, 15, "{e}");
        assert!(e.message.contains(")"), "{e}");
        let e = error("spend_30d > 5 contactable");
        assert_eq!(e.column, 15, "{e}");
        let e = error("\"boots");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("unterminated"));
        let e = error("first_purchase > 2025-02-30");
        assert_eq!(e.column, 18, "{e}");
        let e = error("spend_30d > 5 # 3");
        assert_eq!(e.column, 15, "{e}");
        assert_eq!(error("   ").message, "the expression is empty");
    }

    #[test]
    fn unknown_names_are_refused_with_a_hint() {
        let e = error("contactable and spend_31d > 5");
        assert_eq!(e.column, 17, "{e}");
        assert!(
            e.message
                .contains("unknown feature or function `spend_31d`"),
            "{e}"
        );
        assert!(e.message.contains("spend_30d"), "{e}");
        let e = error("bought_categry(\"x\")");
        assert_eq!(e.column, 1);
        let e = error("spend_30d(\"x\") > 1");
        assert!(e.message.contains("not a function"), "{e}");
        let e = error("category_last(5) > now");
        assert_eq!(e.column, 15, "{e}");
    }

    #[test]
    fn type_errors_are_refused() {
        let e = error("spend_30d > now");
        assert_eq!(e.column, 13, "{e}");
        assert!(
            e.message.contains("cannot compare a number with a time"),
            "{e}"
        );
        let e = error("spend_30d");
        assert!(e.message.contains("must be a condition"), "{e}");
        let e = error("contactable and spend_30d");
        assert_eq!(e.column, 17, "{e}");
        let e = error("now + now > now");
        assert_eq!(e.column, 5, "{e}");
        let e = error("contactable > true");
        assert!(e.message.contains("no order"), "{e}");
        let e = error("days_since(spend_30d) > 1");
        assert_eq!(e.column, 12, "{e}");
        let e = error("tier < \"gold\"");
        assert!(e.message.contains("no order"), "{e}");
        let e = error("not spend_30d");
        assert_eq!(e.column, 5, "{e}");
    }

    #[test]
    fn arithmetic_never_panics_and_minus_is_not_a_date() {
        let f = Features::default();
        assert!(!holds("79228162514264337593543950335 + 1 > 0", &f));
        assert!(holds("not (79228162514264337593543950335 + 1 > 0)", &f));
        assert!(holds("1000-30 = 970", &f));
        assert!(holds("2025-06-15 - 1d < 2025-06-15", &f));
        assert!(holds("now - 30D < now", &f));
        assert!(!holds("last_purchase > now - 36600d - 36600d", &f));
    }

    #[test]
    fn sizes_are_bounded() {
        let long = format!("spend_30d > {}", "1".repeat(MAX_LEN));
        assert!(error(&long).message.contains("at most"));
        let deep = format!("{}contactable{}", "(".repeat(40), ")".repeat(40));
        assert!(error(&deep).message.contains("nesting"));
        let wide = vec!["true"; MAX_NODES].join(" or ");
        assert!(error(&wide).message.contains("parts"));
        assert!(
            error("last_purchase > now - 99999d")
                .message
                .contains("at most")
        );
    }

    #[test]
    fn time_dependence_is_detected() {
        assert!(parse("spend_30d > 1").unwrap().depends_on_time());
        assert!(
            parse("last_purchase > now - 30d")
                .unwrap()
                .depends_on_time()
        );
        assert!(
            parse("not (days_since(last_purchase) < 5)")
                .unwrap()
                .depends_on_time()
        );
        assert!(
            !parse("spend_total > 1 and contactable")
                .unwrap()
                .depends_on_time()
        );
        assert!(!parse("only_brand('x')").unwrap().depends_on_time());
    }

    #[test]
    fn explanations_name_each_condition_and_value() {
        let mut f = Features::default();
        bought(&mut f, 10, 1520, "shoes", "x");
        let source = "spend_365d > 1000 and not contactable_sms";
        let e = parse(source).unwrap();
        let clauses = e.explain(source, &f, Context { now: now() });
        assert_eq!(clauses.len(), 2);
        assert_eq!(clauses[0].text, "spend_365d > 1000");
        assert!(clauses[0].holds);
        assert_eq!(clauses[0].values, ["spend_365d = 1520"]);
        assert_eq!(clauses[1].text, "not contactable_sms");
        assert!(clauses[1].holds);
        assert_eq!(clauses[1].values, ["contactable_sms = false"]);
    }
}
