//! The OpenAPI 3.1 document of the HTTP/JSON API, generated from the protobuf descriptors compiled into the
//! binary (with their comments): one path per method of the Coordinator service, one schema per message
//! and enum it reaches, in the proto3 JSON mapping that pbjson implements (lowerCamelCase names, enums by
//! name, 64-bit integers as strings, timestamps as RFC 3339). `docs/openapi.json` is a copy, kept equal
//! by a test.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use super::STREAMS;

const SERVICE: &str = ".gridforge.v1.Coordinator";
const ERROR: &str = ".gridforge.v1.ApiError";
const TIMESTAMP: &str = ".google.protobuf.Timestamp";

/// The document, as served at `/v1/openapi.json` (pretty-printed, ending in a newline).
pub fn document_json() -> String {
    let mut s = serde_json::to_string_pretty(&document()).unwrap_or_default();
    s.push('\n');
    s
}

/// What the descriptors hold, by full name (".gridforge.v1.Vm"), with each one's comment.
#[derive(Default)]
struct Types<'a> {
    messages: BTreeMap<String, (&'a DescriptorProto, String)>,
    enums: BTreeMap<String, (&'a EnumDescriptorProto, String)>,
    /// Field comments by message name, in field order.
    field_comments: BTreeMap<String, Vec<String>>,
    /// Comments by file and source path.
    comments: BTreeMap<(String, Vec<i32>), String>,
}

impl<'a> Types<'a> {
    fn comment(&self, file: &str, path: &[i32]) -> String {
        self.comments.get(&(file.to_string(), path.to_vec())).cloned().unwrap_or_default()
    }

    fn add_message(&mut self, file: &str, scope: &str, m: &'a DescriptorProto, path: Vec<i32>) {
        let name = format!("{scope}.{}", m.name());
        for (i, nested) in m.nested_type.iter().enumerate() {
            self.add_message(file, &name, nested, [&path[..], &[3, i as i32]].concat());
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let p = [&path[..], &[4, i as i32]].concat();
            self.enums.insert(format!("{name}.{}", e.name()), (e, self.comment(file, &p)));
        }
        let comment = self.comment(file, &path);
        let fields = m
            .field
            .iter()
            .enumerate()
            .map(|(i, _)| self.comment(file, &[&path[..], &[2, i as i32]].concat()))
            .collect::<Vec<_>>();
        self.field_comments.insert(name.clone(), fields);
        self.messages.insert(name, (m, comment));
    }
}

fn document() -> Value {
    let set = FileDescriptorSet::decode(gridforge_proto::FILE_DESCRIPTOR_SET).unwrap_or_default();
    let mut types = Types::default();
    let mut methods = Vec::new();
    for f in &set.file {
        for loc in f.source_code_info.iter().flat_map(|s| &s.location) {
            let text = loc.leading_comments().trim();
            if !text.is_empty() {
                types.comments.insert((f.name().to_string(), loc.path.clone()), normalize(text));
            }
        }
    }
    for f in &set.file {
        let scope = format!(".{}", f.package());
        for (i, m) in f.message_type.iter().enumerate() {
            types.add_message(f.name(), &scope, m, vec![4, i as i32]);
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            let comment = types.comment(f.name(), &[5, i as i32]);
            types.enums.insert(format!("{scope}.{}", e.name()), (e, comment));
        }
        for (si, s) in f.service.iter().enumerate() {
            if format!("{scope}.{}", s.name()) != SERVICE {
                continue;
            }
            for (mi, m) in s.method.iter().enumerate() {
                methods.push((m, types.comment(f.name(), &[6, si as i32, 2, mi as i32])));
            }
        }
    }

    // Only what the methods reach (and the error body).
    let mut reached = BTreeSet::new();
    let mut todo: Vec<String> = methods
        .iter()
        .flat_map(|(m, _)| [m.input_type().to_string(), m.output_type().to_string()])
        .chain([ERROR.to_string()])
        .collect();
    while let Some(name) = todo.pop() {
        if !reached.insert(name.clone()) {
            continue;
        }
        if let Some((m, _)) = types.messages.get(&name) {
            todo.extend(
                m.field.iter().filter(|f| !f.type_name().is_empty()).map(|f| f.type_name().to_string()),
            );
        }
    }

    let mut schemas = Map::new();
    for name in &reached {
        if name == TIMESTAMP {
            continue;
        }
        if let Some((e, comment)) = types.enums.get(name) {
            let values: Vec<Value> = e.value.iter().map(|v| json!(v.name())).collect();
            schemas.insert(key(name), described(json!({"type": "string", "enum": values}), comment));
        } else if let Some((m, comment)) = types.messages.get(name) {
            if m.options.as_ref().is_some_and(|o| o.map_entry()) {
                continue;
            }
            let mut properties = Map::new();
            let fields = types.field_comments.get(name).cloned().unwrap_or_default();
            for (i, f) in m.field.iter().enumerate() {
                let schema = field_schema(&types, f);
                let comment = fields.get(i).cloned().unwrap_or_default();
                properties.insert(f.json_name().to_string(), described(schema, &comment));
            }
            let schema = json!({"type": "object", "properties": properties, "additionalProperties": false});
            schemas.insert(key(name), described(schema, comment));
        }
    }

    let mut paths = Map::new();
    for (m, comment) in &methods {
        let stream = STREAMS.contains(&m.name());
        let answer = if stream {
            json!({
                "description": format!(
                    "Server-sent events: each `data:` line one {} in proto3 JSON; a refusal mid-stream is \
                     an `error` event with an ApiError.",
                    short(m.output_type())
                ),
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            })
        } else {
            json!({
                "description": short(m.output_type()),
                "content": {"application/json": {"schema": reference(m.output_type())}},
            })
        };
        let summary = comment.split(". ").next().unwrap_or_default().trim_end_matches('.').to_string();
        let mut op = json!({
            "operationId": m.name(),
            "requestBody": {
                "required": false,
                "description": "The request in proto3 JSON; an empty body is the empty message.",
                "content": {"application/json": {"schema": reference(m.input_type())}},
            },
            "responses": {
                "200": answer,
                "default": {
                    "description": "A refusal: the HTTP status of its gRPC code, and the same body always.",
                    "content": {"application/json": {"schema": reference(ERROR)}},
                },
            },
        });
        if !comment.is_empty() {
            op["summary"] = json!(summary);
            op["description"] = json!(comment);
        }
        paths.insert(format!("/v1/{}", m.name()), json!({"post": op}));
    }

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "gridforge coordinator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The Coordinator service of gridforge over HTTP: each gRPC method is POST \
                /v1/METHOD with its request message in proto3 JSON (unknown fields are refused). \
                Authentication: a client certificate of the grid's CA, or a bearer token from \
                `gridctl token create`; roles and tenant scope are those of gRPC.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"clientCertificate": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "clientCertificate": {"type": "mutualTLS"},
            },
        },
    })
}

/// "gridforge.v1.Vm" for ".gridforge.v1.Vm".
fn key(name: &str) -> String {
    name.trim_start_matches('.').to_string()
}

fn short(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

fn reference(name: &str) -> Value {
    if name == TIMESTAMP {
        return json!({"type": "string", "format": "date-time"});
    }
    json!({"$ref": format!("#/components/schemas/{}", key(name))})
}

fn described(mut schema: Value, comment: &str) -> Value {
    // Beside a $ref too (3.1 allows it): the description of this use of the type.
    if !comment.is_empty() {
        schema["description"] = json!(comment);
    }
    schema
}

/// Comment lines joined into one paragraph.
fn normalize(text: &str) -> String {
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

fn field_schema(types: &Types<'_>, f: &prost_types::FieldDescriptorProto) -> Value {
    let single = match f.r#type() {
        Type::Double | Type::Float => json!({"type": "number"}),
        Type::Int32 | Type::Sint32 | Type::Sfixed32 => json!({"type": "integer", "format": "int32"}),
        Type::Uint32 | Type::Fixed32 => json!({"type": "integer", "format": "uint32", "minimum": 0}),
        // proto3 JSON writes 64-bit integers as strings and reads either.
        Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
            json!({"type": ["string", "integer"], "format": "int64"})
        }
        Type::Uint64 | Type::Fixed64 => json!({"type": ["string", "integer"], "format": "uint64"}),
        Type::Bool => json!({"type": "boolean"}),
        Type::String => json!({"type": "string"}),
        Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Type::Enum | Type::Message | Type::Group => {
            if let Some((entry, _)) = types.messages.get(f.type_name())
                && entry.options.as_ref().is_some_and(|o| o.map_entry())
            {
                let value = entry.field.iter().find(|v| v.number() == 2);
                let value = value.map(|v| field_schema(types, v)).unwrap_or_else(|| json!({}));
                return json!({"type": "object", "additionalProperties": value});
            }
            reference(f.type_name())
        }
    };
    if f.label() == Label::Repeated { json!({"type": "array", "items": single}) } else { single }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in copy is what the binary serves. After a change to the protos:
    /// `GRIDFORGE_WRITE_OPENAPI=1 cargo test -p gridforge-coordinator openapi` rewrites it.
    #[test]
    fn the_checked_in_document_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let generated = document_json();
        if std::env::var_os("GRIDFORGE_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} differs from the generated document: GRIDFORGE_WRITE_OPENAPI=1 cargo test -p \
             gridforge-coordinator openapi",
            path.display()
        );
    }

    #[test]
    fn every_method_has_a_path_and_every_reference_a_schema() {
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        let mut names: Vec<&str> = paths.keys().map(|p| p.trim_start_matches("/v1/")).collect();
        let mut routed = super::super::METHODS.to_vec();
        names.sort();
        routed.sort();
        assert_eq!(names, routed, "methods of the service vs methods the HTTP API routes");
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for r in text.split("\"#/components/schemas/").skip(1) {
            let name = r.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "{name} is referenced but has no schema");
        }
        let vm = &schemas["gridforge.v1.Vm"];
        assert_eq!(vm["properties"]["desiredState"]["type"], "string", "{vm}");
        assert_eq!(vm["properties"]["created"]["format"], "date-time", "{vm}");
        assert!(vm["description"].is_string() || vm["properties"]["spec"]["description"].is_string(), "{vm}");
        assert_eq!(schemas["gridforge.v1.Node.State"]["enum"][1], "READY");
        assert_eq!(
            schemas["gridforge.v1.Node"]["properties"]["labels"]["additionalProperties"]["type"],
            "string"
        );
        assert!(paths["/v1/CreateVm"]["post"]["description"].as_str().unwrap().contains("Unschedulable"));
    }
}
