//! Column types: how each type OID is decoded. Built-in types are known by OID; others
//! (enums, domains, arrays of them) are resolved from `pg_type` when a relation first uses them.

use std::collections::HashMap;

use sluice_core::types::{oid, TypeKind};

/// Built-in scalar types by OID.
fn builtin_scalar(type_oid: u32) -> Option<TypeKind> {
    use oid::*;
    Some(match type_oid {
        BOOL => TypeKind::Bool,
        BYTEA => TypeKind::Bytea,
        NAME | TEXT | BPCHAR | VARCHAR => TypeKind::Text,
        INT8 => TypeKind::Int8,
        INT2 => TypeKind::Int2,
        INT4 => TypeKind::Int4,
        JSON => TypeKind::Json,
        JSONB => TypeKind::Jsonb,
        FLOAT4 => TypeKind::Float4,
        FLOAT8 => TypeKind::Float8,
        DATE => TypeKind::Date,
        TIME => TypeKind::Time,
        TIMESTAMP => TypeKind::Timestamp,
        TIMESTAMPTZ => TypeKind::TimestampTz,
        INTERVAL => TypeKind::Interval,
        NUMERIC => TypeKind::Numeric,
        UUID => TypeKind::Uuid,
        _ => return None,
    })
}

/// Built-in array types: (array OID, element OID).
const BUILTIN_ARRAYS: &[(u32, u32)] = &[
    (1000, oid::BOOL),
    (1001, oid::BYTEA),
    (1003, oid::NAME),
    (1005, oid::INT2),
    (1007, oid::INT4),
    (1009, oid::TEXT),
    (1014, oid::BPCHAR),
    (1015, oid::VARCHAR),
    (1016, oid::INT8),
    (1021, oid::FLOAT4),
    (1022, oid::FLOAT8),
    (199, oid::JSON),
    (3807, oid::JSONB),
    (1182, oid::DATE),
    (1183, oid::TIME),
    (1115, oid::TIMESTAMP),
    (1185, oid::TIMESTAMPTZ),
    (1187, oid::INTERVAL),
    (1231, oid::NUMERIC),
    (2951, oid::UUID),
];

/// What `pg_type` says of a type that is not built in.
#[derive(Clone, Debug)]
pub struct CatalogType {
    /// The type's OID.
    pub oid: u32,
    /// `typtype`: b base, d domain, e enum, c composite, r range, m multirange, p pseudo.
    pub typtype: u8,
    /// `pg_type.typelem`: the element type of an array type, else 0.
    pub typelem: u32,
    /// `pg_type.typbasetype`: the base type of a domain, else 0.
    pub typbasetype: u32,
    /// `pg_type.typdelim`: the array element delimiter.
    pub typdelim: u8,
    /// An array type.
    pub is_array: bool,
}

/// The decoders known so far, by type OID.
#[derive(Debug, Default)]
pub struct TypeRegistry {
    resolved: HashMap<u32, TypeKind>,
    catalog: HashMap<u32, CatalogType>,
}

impl TypeRegistry {
    /// An empty cache.
    pub fn new() -> Self {
        let mut registry = TypeRegistry::default();
        for &(array, element) in BUILTIN_ARRAYS {
            let kind = TypeKind::Array {
                element: Box::new(builtin_scalar(element).expect("builtin element")),
                element_oid: element,
                delimiter: b',',
            };
            registry.resolved.insert(array, kind);
        }
        registry
    }

    /// The decoder for a type, if it is known without a catalog look-up.
    pub fn get(&self, type_oid: u32) -> Option<TypeKind> {
        builtin_scalar(type_oid).or_else(|| self.resolved.get(&type_oid).cloned())
    }

    /// Type OIDs among `oids` (and the element and base types they lead to) that need a catalog row.
    pub fn missing(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut missing = Vec::new();
        let mut stack: Vec<u32> = oids.into_iter().collect();
        while let Some(type_oid) = stack.pop() {
            if self.get(type_oid).is_some() || missing.contains(&type_oid) {
                continue;
            }
            match self.catalog.get(&type_oid) {
                None => missing.push(type_oid),
                Some(row) if row.is_array && row.typelem != 0 => stack.push(row.typelem),
                Some(row) if row.typtype == b'd' && row.typbasetype != 0 => stack.push(row.typbasetype),
                Some(_) => {}
            }
        }
        missing
    }

    /// Records catalog rows; returns the decoder for each of `oids` once all it needs is known.
    pub fn add_catalog_rows(&mut self, rows: impl IntoIterator<Item = CatalogType>) {
        for row in rows {
            self.catalog.insert(row.oid, row);
        }
    }

    /// The decoder for `type_oid` from built-ins and catalog rows; `Unknown` when the catalog has
    /// nothing more to say.
    pub fn resolve(&mut self, type_oid: u32) -> TypeKind {
        self.resolve_depth(type_oid, 0)
    }

    fn resolve_depth(&mut self, type_oid: u32, depth: u8) -> TypeKind {
        if let Some(kind) = self.get(type_oid) {
            return kind;
        }
        let Some(row) = self.catalog.get(&type_oid).cloned() else {
            return TypeKind::Unknown;
        };
        if depth > 16 {
            return TypeKind::Unknown;
        }
        let kind = if row.is_array && row.typelem != 0 {
            let element = self.resolve_depth(row.typelem, depth + 1);
            let delimiter = self.catalog.get(&row.typelem).map_or(b',', |e| e.typdelim);
            TypeKind::Array { element: Box::new(element), element_oid: row.typelem, delimiter }
        } else if row.typtype == b'e' {
            TypeKind::Enum
        } else if row.typtype == b'd' && row.typbasetype != 0 {
            self.resolve_depth(row.typbasetype, depth + 1)
        } else {
            TypeKind::Unknown
        };
        self.resolved.insert(type_oid, kind.clone());
        kind
    }
}

/// Reads the catalog rows of these type OIDs (`CATALOG_QUERY`).
pub async fn catalog_types(
    sql: &tokio_postgres::Client,
    oids: &[u32],
) -> Result<Vec<CatalogType>, tokio_postgres::Error> {
    let rows = sql.query(CATALOG_QUERY, &[&oids]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let text_byte = |i: usize| row.get::<_, String>(i).bytes().next().unwrap_or(b',');
            CatalogType {
                oid: row.get::<_, i64>(0) as u32,
                typtype: text_byte(1),
                typelem: row.get::<_, i64>(2) as u32,
                typbasetype: row.get::<_, i64>(3) as u32,
                typdelim: text_byte(4),
                is_array: row.get(5),
            }
        })
        .collect())
}

/// The catalog query for `TypeRegistry::missing` OIDs.
pub const CATALOG_QUERY: &str =
    "SELECT oid::int8, typtype::text, typelem::int8, typbasetype::int8, typdelim::text, \
     (typcategory = 'A' AND typelem <> 0) FROM pg_catalog.pg_type WHERE oid = ANY($1::oid[])";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_types_need_no_catalog() {
        let registry = TypeRegistry::new();
        assert_eq!(registry.get(oid::INT4), Some(TypeKind::Int4));
        assert!(matches!(registry.get(1231), Some(TypeKind::Array { element_oid: oid::NUMERIC, .. })));
        assert!(registry.missing([oid::TEXT, 1009]).is_empty());
    }

    #[test]
    fn enum_arrays_and_domains_resolve_from_catalog_rows() {
        let mut registry = TypeRegistry::new();
        assert_eq!(registry.missing([70000, 70001, 70002]), vec![70002, 70001, 70000]);
        registry.add_catalog_rows([
            CatalogType {
                oid: 70000,
                typtype: b'e',
                typelem: 0,
                typbasetype: 0,
                typdelim: b',',
                is_array: false,
            },
            CatalogType {
                oid: 70001,
                typtype: b'b',
                typelem: 70000,
                typbasetype: 0,
                typdelim: b',',
                is_array: true,
            },
            CatalogType {
                oid: 70002,
                typtype: b'd',
                typelem: 0,
                typbasetype: oid::INT8,
                typdelim: b',',
                is_array: false,
            },
        ]);
        assert!(registry.missing([70000, 70001, 70002]).is_empty());
        assert_eq!(registry.resolve(70000), TypeKind::Enum);
        assert_eq!(
            registry.resolve(70001),
            TypeKind::Array { element: Box::new(TypeKind::Enum), element_oid: 70000, delimiter: b',' }
        );
        assert_eq!(registry.resolve(70002), TypeKind::Int8);
        assert_eq!(registry.resolve(99999), TypeKind::Unknown);
    }
}
