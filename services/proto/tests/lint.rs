//! The API follows buf's STANDARD lint rules; this checks the ones that matter for naming
//! and evolution against the compiled descriptors, so no extra tool is needed.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

fn api_files() -> Vec<prost_types::FileDescriptorProto> {
    let set = FileDescriptorSet::decode(loyalty_proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .into_iter()
        .filter(|f| f.package().starts_with("loyalty."))
        .collect()
}

fn upper_snake(pascal: &str) -> String {
    let mut out = String::new();
    for (i, c) in pascal.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn is_pascal(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

fn is_lower_snake(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with('_')
}

fn is_upper_snake(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn check_enum(problems: &mut Vec<String>, e: &prost_types::EnumDescriptorProto) {
    let prefix = format!("{}_", upper_snake(e.name()));
    match e.value.first() {
        Some(v) if v.number() == 0 && v.name() == format!("{prefix}UNSPECIFIED") => {}
        _ => problems.push(format!(
            "enum {}: zero value must be {prefix}UNSPECIFIED",
            e.name()
        )),
    }
    for v in &e.value {
        if !v.name().starts_with(&prefix) || !is_upper_snake(v.name()) {
            problems.push(format!(
                "enum value {} must be UPPER_SNAKE_CASE prefixed {prefix}",
                v.name()
            ));
        }
    }
}

fn check_message(problems: &mut Vec<String>, m: &DescriptorProto) {
    if !is_pascal(m.name()) {
        problems.push(format!("message {} must be PascalCase", m.name()));
    }
    for f in &m.field {
        if !is_lower_snake(f.name()) {
            problems.push(format!(
                "field {}.{} must be lower_snake_case",
                m.name(),
                f.name()
            ));
        }
    }
    for e in &m.enum_type {
        check_enum(problems, e);
    }
    for nested in m
        .nested_type
        .iter()
        .filter(|n| !n.options.as_ref().is_some_and(|o| o.map_entry()))
    {
        check_message(problems, nested);
    }
}

#[test]
fn api_follows_buf_standard_rules() {
    let files = api_files();
    assert_eq!(
        files.len(),
        7,
        "one file per package: common, events and the five services"
    );
    let mut problems = Vec::new();
    let mut used: HashMap<String, String> = HashMap::new();
    for file in &files {
        let package = file.package();
        let dir = package.replace('.', "/");
        if !file.name().starts_with(&format!("{dir}/")) {
            problems.push(format!(
                "{}: directory must match package {package}",
                file.name()
            ));
        }
        if !package.ends_with(".v1") {
            problems.push(format!("{package}: package must end in a version"));
        }
        for e in &file.enum_type {
            check_enum(&mut problems, e);
        }
        for m in &file.message_type {
            check_message(&mut problems, m);
        }
        for service in &file.service {
            if !service.name().ends_with("Service") {
                problems.push(format!("service {} must end in Service", service.name()));
            }
            for rpc in &service.method {
                for (kind, ty) in [
                    ("Request", rpc.input_type()),
                    ("Response", rpc.output_type()),
                ] {
                    let short = ty.rsplit('.').next().unwrap();
                    let plain = format!("{}{kind}", rpc.name());
                    let long = format!("{}{}{kind}", service.name(), rpc.name());
                    if !ty.starts_with(&format!(".{package}.")) || (short != plain && short != long)
                    {
                        problems.push(format!(
                            "{}.{}: {kind} must be {plain}",
                            service.name(),
                            rpc.name()
                        ));
                    }
                    let rpc_name = format!("{}.{}", service.name(), rpc.name());
                    if let Some(other) = used.insert(ty.to_string(), rpc_name.clone()) {
                        problems.push(format!("{ty} is used by both {other} and {rpc_name}"));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "lint problems:\n{}",
        problems.join("\n")
    );
}

#[test]
fn pos_facing_calls_exist() {
    let files = api_files();
    let rpcs: Vec<String> = files
        .iter()
        .flat_map(|f| {
            f.service.iter().flat_map(move |s| {
                s.method
                    .iter()
                    .map(move |m| format!("{}.{}", s.name(), m.name()))
            })
        })
        .collect();
    for rpc in [
        "CheckoutService.Quote",
        "CheckoutService.Commit",
        "CheckoutService.Refund",
        "MemberService.LookupMember",
        "BalanceService.GetBalance",
    ] {
        assert!(rpcs.iter().any(|r| r == rpc), "{rpc} missing");
    }
}
