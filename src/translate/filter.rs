//! Table-mapping filters: which rows a mapping writes. Shared by the DynamoDB and Postgres
//! translators; a row that leaves the filter is deleted from the target.

use sluice_core::Problem;

use super::mapping::{Constant, Predicate, PredicateOp};
use super::{text_of, TranslateError};
use sluice_core::{Relation, Value};

/// Whether a row (values in `relation`'s column order; `None` for unchanged TOAST) satisfies
/// every predicate of a table mapping's filter.
pub fn passes_filter(
    filter: &[Predicate],
    source: &str,
    relation: &Relation,
    row: &[Option<&Value>],
) -> Result<bool, TranslateError> {
    for predicate in filter {
        let index = relation.columns.iter().position(|c| c.name == predicate.column).ok_or_else(|| {
            TranslateError::Fatal {
                table: source.to_owned(),
                reason: format!("filter column {} is not in the table", predicate.column),
            }
        })?;
        // An unchanged TOASTed column did not change: it cannot move the row across the filter.
        let Some(value) = row[index] else { continue };
        if !matches(predicate, value) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Problems of a table mapping's filter: operators without the value they compare with.
pub fn filter_problems(prefix: &str, filter: &[Predicate], problems: &mut Vec<Problem>) {
    for (j, predicate) in filter.iter().enumerate() {
        let needs_value = !matches!(
            predicate.op,
            PredicateOp::IsNull | PredicateOp::NotNull | PredicateOp::In | PredicateOp::NotIn
        );
        if needs_value && predicate.value.is_none() {
            problems.push(Problem::new(prefix, &format!("filter[{j}].value"), "this operator needs a value"));
        }
        if matches!(predicate.op, PredicateOp::In | PredicateOp::NotIn) && predicate.values.is_empty() {
            problems.push(Problem::new(
                prefix,
                &format!("filter[{j}].values"),
                "in / not_in need a list of values",
            ));
        }
    }
}

fn matches(predicate: &Predicate, value: &Value) -> bool {
    use std::cmp::Ordering;
    let compare = |constant: &Constant| -> Option<Ordering> {
        match (constant, value) {
            (_, Value::Null) => None,
            (Constant::Bool(b), Value::Bool(v)) => Some(v.cmp(b)),
            // Integers compare exactly (an f64 is wrong above 2^53); floats as floats.
            (Constant::Integer(c), Value::Int2(v)) => Some(i64::from(*v).cmp(c)),
            (Constant::Integer(c), Value::Int4(v)) => Some(i64::from(*v).cmp(c)),
            (Constant::Integer(c), Value::Int8(v)) => Some(v.cmp(c)),
            (Constant::Integer(c), Value::Float4(_) | Value::Float8(_)) => {
                text_of(value).parse::<f64>().ok()?.partial_cmp(&(*c as f64))
            }
            (Constant::Integer(c), _) => {
                let text = text_of(value);
                decimal_cmp(&text, &c.to_string())
                    .or_else(|| text.parse::<f64>().ok()?.partial_cmp(&(*c as f64)))
            }
            (Constant::Float(c), _) => text_of(value).parse::<f64>().ok()?.partial_cmp(c),
            (Constant::Text(t), _) => Some(text_of(value).as_str().cmp(t.as_str())),
            (Constant::Bool(_), _) => None,
        }
    };
    let is =
        |wanted: &[Ordering]| predicate.value.as_ref().and_then(compare).is_some_and(|o| wanted.contains(&o));
    match predicate.op {
        PredicateOp::IsNull => matches!(value, Value::Null),
        PredicateOp::NotNull => !matches!(value, Value::Null),
        PredicateOp::Eq => is(&[Ordering::Equal]),
        PredicateOp::Ne => !matches!(value, Value::Null) && !is(&[Ordering::Equal]),
        PredicateOp::Lt => is(&[Ordering::Less]),
        PredicateOp::Le => is(&[Ordering::Less, Ordering::Equal]),
        PredicateOp::Gt => is(&[Ordering::Greater]),
        PredicateOp::Ge => is(&[Ordering::Greater, Ordering::Equal]),
        PredicateOp::In => predicate.values.iter().any(|c| compare(c) == Some(Ordering::Equal)),
        PredicateOp::NotIn => {
            !matches!(value, Value::Null)
                && !predicate.values.iter().any(|c| compare(c) == Some(Ordering::Equal))
        }
    }
}

/// Compares two plain decimal texts (`-12.50`) exactly; `None` when either is not one.
fn decimal_cmp(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let (a_negative, a_int, a_frac) = decimal_parts(a)?;
    let (b_negative, b_int, b_frac) = decimal_parts(b)?;
    let a_zero = a_int.is_empty() && a_frac.is_empty();
    let b_zero = b_int.is_empty() && b_frac.is_empty();
    let a_sign = if a_zero {
        0
    } else if a_negative {
        -1
    } else {
        1
    };
    let b_sign = if b_zero {
        0
    } else if b_negative {
        -1
    } else {
        1
    };
    if a_sign != b_sign {
        return Some(a_sign.cmp(&b_sign));
    }
    let magnitude =
        a_int.len().cmp(&b_int.len()).then_with(|| a_int.cmp(b_int)).then_with(|| a_frac.cmp(b_frac));
    Some(if a_sign < 0 { magnitude.reverse() } else { magnitude })
}

/// Sign, integer digits without leading zeros, fraction digits without trailing zeros.
fn decimal_parts(text: &str) -> Option<(bool, &str, &str)> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some((negative, int.trim_start_matches('0'), frac.trim_end_matches('0')))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use sluice_core::TypeKind;

    use super::*;
    use sluice_core::{Column, ReplicaIdentity};

    fn single(op: PredicateOp, value: Constant) -> Predicate {
        Predicate { column: "n".into(), op, value: Some(value), values: Vec::new() }
    }

    #[test]
    fn integers_above_two_to_the_53_compare_exactly() {
        // 9007199254740993 = 2^53 + 1 reads as 2^53 in an f64.
        let big = Constant::Integer(9_007_199_254_740_993);
        for value in [
            Value::Int8(9_007_199_254_740_992),
            Value::Numeric(sluice_core::Numeric::Finite("9007199254740992".into())),
            Value::Text("9007199254740992".into()),
        ] {
            assert!(!matches(&single(PredicateOp::Eq, big.clone()), &value), "{value:?}");
            assert!(matches(&single(PredicateOp::Lt, big.clone()), &value), "{value:?}");
        }
        assert!(matches(&single(PredicateOp::Eq, big.clone()), &Value::Int8(9_007_199_254_740_993)));
        let numeric = Value::Numeric(sluice_core::Numeric::Finite("9007199254740993.000".into()));
        assert!(matches(&single(PredicateOp::Eq, big), &numeric));
    }

    #[test]
    fn decimal_texts_compare_by_value() {
        use std::cmp::Ordering::*;
        for (a, b, want) in [
            ("1", "1.0", Equal),
            ("-0", "0.00", Equal),
            ("-2", "-10", Greater),
            ("10.5", "9.99", Greater),
            ("0.1", "0.10001", Less),
            ("-0.5", "0", Less),
        ] {
            assert_eq!(decimal_cmp(a, b), Some(want), "{a} vs {b}");
        }
        assert_eq!(decimal_cmp("1e5", "1"), None);
        assert_eq!(decimal_cmp("NaN", "1"), None);
    }

    fn relation() -> Relation {
        let column = |name: &str, kind: TypeKind| Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            is_key: false,
            kind,
        };
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![column("total", TypeKind::Int8), column("status", TypeKind::Text)],
        }
    }

    fn predicate(column: &str, op: PredicateOp, value: Option<Constant>, values: Vec<Constant>) -> Predicate {
        Predicate { column: column.into(), op, value, values }
    }

    fn passes(predicate: &Predicate, total: Option<Value>, status: Option<Value>) -> bool {
        passes_filter(
            std::slice::from_ref(predicate),
            "public.orders",
            &relation(),
            &[total.as_ref(), status.as_ref()],
        )
        .unwrap()
    }

    #[test]
    fn numbers_compare_numerically_and_text_as_text() {
        let gt9 = predicate("total", PredicateOp::Gt, Some(Constant::Integer(9)), vec![]);
        // As text "10" < "9"; as a number it is greater.
        assert!(passes(&gt9, Some(Value::Int8(10)), None));
        assert!(!passes(&gt9, Some(Value::Int8(9)), None));
        let le = predicate("total", PredicateOp::Le, Some(Constant::Float(2.5)), vec![]);
        assert!(passes(&le, Some(Value::Int8(2)), None) && !passes(&le, Some(Value::Int8(3)), None));
        let text = predicate("status", PredicateOp::Lt, Some(Constant::Text("m".into())), vec![]);
        assert!(passes(&text, None, Some(Value::Text("active".into()))));
        assert!(!passes(&text, None, Some(Value::Text("open".into()))));
    }

    #[test]
    fn null_matches_only_is_null_as_in_sql() {
        let null = Some(Value::Null);
        for op in [PredicateOp::Eq, PredicateOp::Ne, PredicateOp::Lt, PredicateOp::Ge, PredicateOp::NotNull] {
            assert!(
                !passes(
                    &predicate("status", op, Some(Constant::Text("x".into())), vec![]),
                    None,
                    null.clone()
                ),
                "{op:?}"
            );
        }
        for op in [PredicateOp::In, PredicateOp::NotIn] {
            assert!(
                !passes(&predicate("status", op, None, vec![Constant::Text("x".into())]), None, null.clone()),
                "{op:?}"
            );
        }
        assert!(passes(&predicate("status", PredicateOp::IsNull, None, vec![]), None, null));
    }

    #[test]
    fn an_unchanged_toast_value_leaves_the_row_where_it_was() {
        let eq = predicate("status", PredicateOp::Eq, Some(Constant::Text("active".into())), vec![]);
        assert!(passes(&eq, Some(Value::Int8(1)), None));
    }

    #[test]
    fn a_filter_column_the_table_lacks_is_named() {
        let missing = predicate("state", PredicateOp::IsNull, None, vec![]);
        let error = passes_filter(&[missing], "public.orders", &relation(), &[None, None]).unwrap_err();
        assert_eq!(error.to_string(), "table public.orders: filter column state is not in the table");
    }

    #[test]
    fn operators_without_their_values_are_problems() {
        let mut problems = Vec::new();
        let filter = [
            predicate("total", PredicateOp::Gt, None, vec![]),
            predicate("status", PredicateOp::In, None, vec![]),
        ];
        filter_problems("mapping.tables[0]", &filter, &mut problems);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["mapping.tables[0].filter[0].value", "mapping.tables[0].filter[1].values"]);
    }

    proptest! {
        /// For a non-NULL value, `ne` and `not_in` are exactly the negations of `eq` and `in`,
        /// and `lt`/`eq`/`gt` split every value three ways.
        #[test]
        fn negations_and_orderings_are_consistent(total in any::<i64>(), bound in any::<i64>(), list in proptest::collection::vec(any::<i64>(), 1..4)) {
            let value = || Some(Value::Int8(total));
            let with = |op| predicate("total", op, Some(Constant::Integer(bound)), vec![]);
            let within = |op| predicate("total", op, None, list.iter().map(|&n| Constant::Integer(n)).collect());
            prop_assert_eq!(passes(&with(PredicateOp::Ne), value(), None), !passes(&with(PredicateOp::Eq), value(), None));
            prop_assert_eq!(passes(&within(PredicateOp::NotIn), value(), None), !passes(&within(PredicateOp::In), value(), None));
            let split = [PredicateOp::Lt, PredicateOp::Eq, PredicateOp::Gt].map(|op| passes(&with(op), value(), None));
            prop_assert_eq!(split.iter().filter(|&&b| b).count(), 1);
            prop_assert_eq!(passes(&with(PredicateOp::Le), value(), None), split[0] || split[1]);
        }
    }
}
