//! COPY's text format (`COPY (…) TO STDOUT`), as the backfill reads tables: decoded as it
//! arrives into the values of a table's columns.

use sluice_core::Value;

use crate::catalog::Table;

/// Decoded rows, and the last row's primary key as text.
pub type Page = (Vec<Vec<Value>>, Option<Vec<String>>);

/// Decodes COPY's text format (tab-separated fields, `\\N` for NULL, backslash escapes)
/// straight into values of the table's columns, as the data arrives: the decoding of one part
/// overlaps the server's producing the next. `finish` also gives the primary key of the last
/// row as text, the next page's lower bound.
pub struct CopyDecoder<'a> {
    table: &'a Table,
    rows: Vec<Vec<Value>>,
    /// The start of a row whose end has not arrived yet.
    carry: Vec<u8>,
    /// For each column, its place in the primary key.
    key_place: Vec<Option<usize>>,
    /// The last row's primary-key fields as text (the buffers are reused row after row).
    last_key: Vec<String>,
    unescaped: String,
}

impl<'a> CopyDecoder<'a> {
    /// A decoder for rows of `table`.
    pub fn new(table: &'a Table) -> Self {
        let mut key_place = vec![None; table.relation.columns.len()];
        for (place, &column) in table.primary_key.iter().enumerate() {
            if let Some(slot) = key_place.get_mut(column) {
                *slot = Some(place);
            }
        }
        CopyDecoder {
            table,
            rows: Vec::new(),
            carry: Vec::new(),
            key_place,
            last_key: vec![String::new(); table.primary_key.len()],
            unescaped: String::new(),
        }
    }

    /// Decodes the rows complete in `data`, keeping a partial last line for the next call.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        if !self.carry.is_empty() {
            let Some(end) = memchr::memchr(b'\n', data) else {
                self.carry.extend_from_slice(data);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.carry);
            line.extend_from_slice(&data[..end]);
            self.line(&line)?;
            line.clear();
            self.carry = line;
            data = &data[end + 1..];
        }
        while let Some(end) = memchr::memchr(b'\n', data) {
            self.line(&data[..end])?;
            data = &data[end + 1..];
        }
        self.carry.extend_from_slice(data);
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        if line.is_empty() {
            return Ok(());
        }
        // Tabs and backslashes are ASCII: the fields of valid UTF-8 are valid UTF-8.
        let line = std::str::from_utf8(line).map_err(|_| NOT_UTF8.to_string())?;
        let columns = &self.table.relation.columns;
        let mut row = Vec::with_capacity(columns.len());
        let mut fields = line.split('\t');
        for (column, key_place) in columns.iter().zip(&self.key_place) {
            let Some(field) = fields.next() else {
                return Err(format!(
                    "a COPY row has {} fields, the table {} columns",
                    row.len(),
                    columns.len()
                ));
            };
            let text = field_text(field, &mut self.unescaped)?;
            if let Some(place) = *key_place {
                let key = &mut self.last_key[place];
                key.clear();
                key.push_str(text.unwrap_or_default());
            }
            row.push(column.decode_text(text)?);
        }
        if fields.next().is_some() {
            return Err(format!("a COPY row has more fields than the table's {} columns", columns.len()));
        }
        self.rows.push(row);
        Ok(())
    }

    /// The rows and the key of the last one; an error when data ends inside a row.
    pub fn finish(self) -> Result<Page, String> {
        if !self.carry.is_empty() {
            return Err("the COPY data ends inside a row".into());
        }
        if self.rows.is_empty() {
            return Ok((self.rows, None));
        }
        Ok((self.rows, Some(self.last_key)))
    }
}

const NOT_UTF8: &str = "COPY data is not UTF-8 (the database encoding must be UTF8)";

/// A field's text (unescaped into `buffer` when it has escapes); None for NULL.
fn field_text<'b>(field: &'b str, buffer: &'b mut String) -> Result<Option<&'b str>, String> {
    if field == "\\N" {
        return Ok(None);
    }
    if !field.contains('\\') {
        return Ok(Some(field));
    }
    unescape(field, buffer)?;
    Ok(Some(buffer))
}

/// Decodes a whole COPY text (see `CopyDecoder`).
pub fn decode_copy(data: &[u8], table: &Table) -> Result<Page, String> {
    let mut decoder = CopyDecoder::new(table);
    decoder.feed(data)?;
    decoder.finish()
}

fn unescape(field: &str, out: &mut String) -> Result<(), String> {
    out.clear();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(other) => out.push(other),
            None => return Err("COPY data ends in a lone backslash".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sluice_core::{Column, Relation, ReplicaIdentity, TypeKind};

    fn text_table(columns: usize) -> Table {
        let column = |i: usize| Column {
            name: format!("c{i}"),
            type_oid: 25,
            type_modifier: -1,
            is_key: i == 0,
            kind: TypeKind::Text,
        };
        Table {
            relation: Relation {
                oid: 1,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: (0..columns).map(column).collect(),
            },
            primary_key: vec![0],
            sql_types: vec!["text".into(); columns],
        }
    }

    /// A field as COPY's text format writes it.
    fn escape(field: &Option<String>) -> String {
        let Some(text) = field else { return "\\N".into() };
        let mut out = String::new();
        for c in text.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                '\u{b}' => out.push_str("\\v"),
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn copy_text_decodes_into_values_with_nulls_escapes_and_the_last_key() {
        let column = |name: &str, kind: TypeKind| Column {
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
            is_key: name == "id",
            kind,
        };
        let table = Table {
            relation: Relation {
                oid: 1,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![
                    column("id", TypeKind::Int8),
                    column("name", TypeKind::Text),
                    column("note", TypeKind::Text),
                ],
            },
            primary_key: vec![0],
            sql_types: vec!["bigint".into(), "text".into(), "text".into()],
        };
        let data = b"1\tada\t\\N\n2\ttab\\there\\\\back\\nline\tx\n";
        let (rows, last) = decode_copy(data, &table).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], vec![Value::Int8(1), Value::Text("ada".into()), Value::Null]);
        assert_eq!(rows[1][1], Value::Text("tab\there\\back\nline".into()));
        assert_eq!(last, Some(vec!["2".to_string()]));
        assert!(decode_copy(b"1\t2\n", &table).unwrap_err().contains("2 fields"));
        // Rows split anywhere across the parts of the stream.
        let mut decoder = CopyDecoder::new(&table);
        for part in data.chunks(3) {
            decoder.feed(part).unwrap();
        }
        assert_eq!(decoder.finish().unwrap(), (rows, last));
        assert!(decode_copy(b"x\t2\t3\n", &table).unwrap_err().contains("column id"));
    }

    proptest! {
        /// Whatever the fields hold and wherever the stream is cut, decoding gives back the
        /// rows COPY encoded, and the last row's key.
        #[test]
        fn any_rows_round_trip_through_copy_text_split_anywhere(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(any::<String>()), 3),
                1..8,
            ),
            cut in 1usize..64,
        ) {
            // The key column is never NULL.
            let rows: Vec<Vec<Option<String>>> = rows
                .into_iter()
                .map(|mut row| { row[0].get_or_insert_with(String::new); row })
                .collect();
            let mut data = String::new();
            for row in &rows {
                let fields: Vec<String> = row.iter().map(escape).collect();
                data.push_str(&fields.join("\t"));
                data.push('\n');
            }
            let table = text_table(3);
            let mut decoder = CopyDecoder::new(&table);
            for part in data.as_bytes().chunks(cut) {
                decoder.feed(part).unwrap();
            }
            let (decoded, last) = decoder.finish().unwrap();
            let expected: Vec<Vec<Value>> = rows
                .iter()
                .map(|row| row.iter().map(|f| f.clone().map_or(Value::Null, Value::Text)).collect())
                .collect();
            prop_assert_eq!(decoded, expected);
            prop_assert_eq!(last, Some(vec![rows.last().unwrap()[0].clone().unwrap()]));
        }
    }
}
