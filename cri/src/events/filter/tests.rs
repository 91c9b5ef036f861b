use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// A flat object: dotted paths to values.
struct Obj(BTreeMap<String, String>);

impl Fields for Obj {
    fn field(&self, path: &[String]) -> Option<String> {
        self.0.get(&path.join("\u{0}")).cloned()
    }
}

fn obj(pairs: &[(&[&str], &str)]) -> Obj {
    Obj(pairs
        .iter()
        .map(|(p, v)| (p.join("\u{0}"), v.to_string()))
        .collect())
}

fn task_exit() -> Obj {
    obj(&[
        (&["topic"], "/tasks/exit"),
        (&["namespace"], "k8s.io"),
        (&["event", "id"], "abc"),
        (&["event", "labels", "a.b"], "x y"),
    ])
}

fn matches(filters: &[&str], o: &Obj) -> bool {
    Filter::parse_all(filters).unwrap().matches(o)
}

#[test]
fn the_issue_examples_select_what_they_say() {
    let exit = task_exit();
    let mut other_ns = task_exit();
    other_ns.0.insert("namespace".into(), "moby".into());
    let container = obj(&[
        (&["topic"], "/containers/create"),
        (&["namespace"], "k8s.io"),
    ]);
    let f = ["topic~=/tasks/.+,namespace==k8s.io"];
    assert!(matches(&f, &exit));
    assert!(!matches(&f, &other_ns));
    assert!(!matches(&f, &container));
    assert!(matches(&["topic==\"/tasks/exit\""], &exit));
    assert!(!matches(&["topic==\"/tasks/exit\""], &container));
}

#[test]
fn operators_presence_paths_and_or() {
    let o = task_exit();
    assert!(matches(&["event.id"], &o));
    assert!(!matches(&["event.pid"], &o));
    assert!(matches(&["event.labels.\"a.b\"==\"x y\""], &o));
    assert!(matches(&["event.id!=abd"], &o));
    assert!(matches(&["event.pid!=1"], &o), "absent is \"\"");
    assert!(!matches(&["event.id!=abc"], &o));
    assert!(matches(&["event.id~=^a.c$"], &o));
    assert!(matches(&["topic~=|^/tasks/|"], &o), "|..| quotes a regexp");
    assert!(
        matches(&["topic~=/^.tasks.exit$/"], &o),
        "/../ quotes a regexp"
    );
    assert!(
        matches(&["namespace==moby", "event.id==abc"], &o),
        "filters OR"
    );
    assert!(
        !matches(&["namespace==k8s.io,event.id==abd"], &o),
        "selectors AND"
    );
    assert!(
        matches(&[], &o) && matches(&[""], &o),
        "nothing filters nothing"
    );
    assert!(
        matches(&[" topic == /tasks/exit , namespace "], &o),
        "spaces"
    );
}

#[test]
fn regexp_literals_plain_slashes_empty_filters_and_the_cap() {
    let o = task_exit();
    assert!(
        matches(&[r"event.id~=/^\w+$/"], &o),
        "\\w reaches the regexp"
    );
    assert!(
        matches(&["topic==/tasks/exit"], &o),
        "after == a slash is plain"
    );
    assert!(
        matches(&["topic~=/tasks/exit"], &o),
        "an unclosed /.../ is plain"
    );
    assert!(
        matches(&["", "namespace==moby"], &o),
        "an empty filter matches all"
    );
    assert!(parse("/a/==b").is_err(), "only \" quotes a field");
    assert!(parse(r#"a=="\x+1""#).is_err(), "a sign is not a digit");
    let many: Vec<String> = (0..=MAX_FILTERS).map(|i| format!("a=={i}")).collect();
    assert!(
        Filter::parse_all(&many)
            .unwrap_err()
            .message
            .contains("at most")
    );
}

#[test]
fn quoted_text_takes_go_escapes() {
    let p = parse(r#"a=="\x41\u00e9\101\t\"\\""#).unwrap();
    assert_eq!(p[0].op, Op::Equal("A\u{e9}A\t\"\\".into()));
    let p = parse(r#"a~=/\/x/"#).unwrap();
    assert!(matches!(&p[0].op, Op::Matches(r) if r.as_str() == "/x"));
}

#[test]
fn errors_point_at_the_offending_byte() {
    for (input, pos, needle) in [
        ("topic==", 7, "expected a value"),
        ("topic=", 5, "unsupported operator"),
        ("topic=>x", 5, "unsupported operator"),
        ("topic==a b", 9, "unexpected 'b'"),
        (",topic", 0, "expected a field"),
        ("topic==a,", 9, "expected a field"),
        ("labels.\"a", 7, "not terminated"),
        ("a==\"\\q\"", 4, "bad escape"),
        ("a~=(x", 3, "bad regular expression"),
        ("a.", 2, "expected a field"),
        ("a==\"\\xff\"", 3, "not UTF-8"),
        ("a$", 1, "unexpected '$'"),
    ] {
        let e = parse(input).expect_err(input);
        assert_eq!((e.pos, e.input.as_str()), (pos, input), "{input}: {e}");
        assert!(e.to_string().contains(needle), "{input}: {e}");
        assert!(e.to_string().contains(">|") || pos == input.len(), "{e}");
    }
    let long = "a".repeat(MAX_FILTER_BYTES + 1);
    assert!(parse(&long).unwrap_err().message.contains("longer than"));
}

fn random_text(rng: &mut StdRng) -> String {
    let alphabet = [
        'a', 'Z', '0', '_', '-', '.', ',', ' ', '"', '\\', '/', '|', '=', '!', '~', '\n', '\t',
        'é', '✓', '\u{1}',
    ];
    let n = rng.random_range(0..8);
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

fn random_selector(rng: &mut StdRng) -> (Vec<String>, u8, String) {
    let depth = rng.random_range(1..4);
    let path = (0..depth)
        .map(|_| {
            loop {
                let t = random_text(rng);
                if !t.is_empty() {
                    break t;
                }
            }
        })
        .collect();
    (path, rng.random_range(0..3), random_text(rng))
}

fn render((path, op, value): &(Vec<String>, u8, String)) -> String {
    let path: Vec<String> = path.iter().map(|f| quote(f, is_field_char)).collect();
    let value_char = |c: char| c != ',' && !c.is_whitespace();
    match op {
        0 => path.join("."),
        1 => format!("{}=={}", path.join("."), quote(value, value_char)),
        _ => format!("{}!={}", path.join("."), quote(value, value_char)),
    }
}

/// Property: any selectors, rendered with quoting where needed, parse back to
/// themselves; and an object holding exactly those fields matches `==` and
/// presence and fails `!=`.
#[test]
fn rendered_filters_parse_back_and_match_their_own_fields() {
    let mut rng = StdRng::seed_from_u64(0xbe47);
    for _ in 0..3000 {
        let n = rng.random_range(1..4);
        let sels: Vec<_> = (0..n).map(|_| random_selector(&mut rng)).collect();
        let text: Vec<String> = sels.iter().map(render).collect();
        let text = text.join(",");
        let parsed = parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(parsed.len(), sels.len(), "{text:?}");
        for (p, (path, op, value)) in parsed.iter().zip(&sels) {
            assert_eq!(&p.path, path, "{text:?}");
            let want = match op {
                0 => Op::Present,
                1 => Op::Equal(value.clone()),
                _ => Op::NotEqual(value.clone()),
            };
            assert_eq!(p.op, want, "{text:?}");
            let o = Obj([(path.join("\u{0}"), value.clone())].into());
            let hit = Filter {
                any_of: vec![vec![p.clone()]],
            }
            .matches(&o);
            assert_eq!(hit, *op != 2, "{text:?}");
        }
    }
}

/// Property: arbitrary input never panics; it parses or names a position inside it.
#[test]
fn arbitrary_input_parses_or_fails_in_bounds() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..20000 {
        let mut s = random_text(&mut rng);
        s.push_str(&random_text(&mut rng));
        if let Err(e) = parse(&s) {
            assert!(e.pos <= s.len() && s.is_char_boundary(e.pos), "{s:?}: {e}");
        }
    }
}
