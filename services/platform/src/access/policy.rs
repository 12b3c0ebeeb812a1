//! Which roles may call which RPC, and where each request names its tenant, store and member.
//!
//! Every RPC the API serves is listed in [`RULES`] with the roles it allows; a test checks
//! the list against the API's descriptors, so a new RPC cannot ship undeclared. The field
//! paths are read from the descriptors at start: the caller's tenant (and, for bound keys,
//! its store or member) is checked on the wire, before any handler runs.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet, field_descriptor_proto::Type};

use super::Role;

use Role::{Admin as AD, Analyst as AN, App as AP, Pos as PO, Service as SV};

/// Every RPC and the roles it allows. `service` (our own services calling each other) is
/// listed where a peer really calls, and may create a tenant's first admin key
/// (`loyalty create-key --addr`).
pub const RULES: &[(&str, &[Role])] = &[
    // Identity.
    (
        "loyalty.identity.v1.MemberService/RegisterMember",
        &[PO, AP, AD, SV],
    ),
    (
        "loyalty.identity.v1.MemberService/GetMember",
        &[PO, AP, AD, SV],
    ),
    (
        "loyalty.identity.v1.MemberService/LookupMember",
        &[PO, AD, SV],
    ),
    ("loyalty.identity.v1.MemberService/UpdateProfile", &[AP, AD]),
    (
        "loyalty.identity.v1.MemberService/SetConsents",
        &[PO, AP, AD],
    ),
    ("loyalty.identity.v1.MemberService/MergeMembers", &[AD]),
    ("loyalty.identity.v1.MemberService/EraseMember", &[AD]),
    ("loyalty.identity.v1.MemberService/ListMembers", &[AD, SV]),
    ("loyalty.identity.v1.MemberService/ImportMembers", &[AD]),
    // Replays read every tenant: only for rebuilding a consumer's derived state.
    (
        "loyalty.identity.v1.MemberService/ReplayMemberEvents",
        &[SV],
    ),
    ("loyalty.identity.v1.MemberService/BlockMember", &[AD]),
    ("loyalty.identity.v1.MemberService/UnblockMember", &[AD]),
    ("loyalty.identity.v1.CardService/IssueCard", &[PO, AD]),
    ("loyalty.identity.v1.CardService/GetCard", &[PO, AD, SV]),
    ("loyalty.identity.v1.CardService/ImportCardRange", &[AD]),
    ("loyalty.identity.v1.CardService/BindCard", &[PO, AP, AD]),
    ("loyalty.identity.v1.CardService/BlockCard", &[AD]),
    ("loyalty.identity.v1.CardService/ReplaceCard", &[PO, AD]),
    (
        "loyalty.identity.v1.ReferralService/ResolveReferralCode",
        &[PO, AP, AD, SV],
    ),
    ("loyalty.identity.v1.AccessService/CreateApiKey", &[AD, SV]),
    ("loyalty.identity.v1.AccessService/ListApiKeys", &[AD]),
    ("loyalty.identity.v1.AccessService/RotateApiKey", &[AD]),
    ("loyalty.identity.v1.AccessService/RevokeApiKey", &[AD]),
    ("loyalty.identity.v1.AccessService/VerifyApiKey", &[SV]),
    // Balance.
    (
        "loyalty.balance.v1.BalanceService/GetBalance",
        &[PO, AP, AD, SV],
    ),
    // Points without a receipt are the back office's: a till accrues through checkout.
    ("loyalty.balance.v1.BalanceService/Accrue", &[AD, SV]),
    // A till redeems through checkout, which counts the redemption against the velocity
    // limits: it may hold points, but spends them only by naming the hold in a Commit.
    ("loyalty.balance.v1.BalanceService/Redeem", &[AD, SV]),
    ("loyalty.balance.v1.BalanceService/Hold", &[PO, SV]),
    ("loyalty.balance.v1.BalanceService/ConfirmHold", &[SV]),
    ("loyalty.balance.v1.BalanceService/CancelHold", &[PO, SV]),
    ("loyalty.balance.v1.BalanceService/GetHold", &[PO, AD, SV]),
    ("loyalty.balance.v1.BalanceService/Reverse", &[AD, SV]),
    ("loyalty.balance.v1.BalanceService/Adjust", &[AD]),
    (
        "loyalty.balance.v1.BalanceService/ActivatePending",
        &[AD, SV],
    ),
    (
        "loyalty.balance.v1.BalanceService/ListLedgerEntries",
        &[AP, AD, SV],
    ),
    ("loyalty.balance.v1.BalanceService/BulkAccrue", &[AD]),
    (
        "loyalty.balance.v1.BalanceService/TransferMember",
        &[AD, SV],
    ),
    (
        "loyalty.balance.v1.BalanceService/ReplayLedgerEvents",
        &[SV],
    ),
    (
        "loyalty.balance.v1.GiftCertificateService/IssueCertificate",
        &[PO, AD],
    ),
    (
        "loyalty.balance.v1.GiftCertificateService/GetCertificate",
        &[PO, AD],
    ),
    (
        "loyalty.balance.v1.GiftCertificateService/SpendCertificate",
        &[PO, AD, SV],
    ),
    (
        "loyalty.balance.v1.GiftCertificateService/RefundCertificate",
        &[PO, AD, SV],
    ),
    // Promotion.
    ("loyalty.promotion.v1.CheckoutService/Quote", &[PO, SV]),
    ("loyalty.promotion.v1.CheckoutService/Commit", &[PO, SV]),
    ("loyalty.promotion.v1.CheckoutService/Refund", &[PO, SV]),
    (
        "loyalty.promotion.v1.CheckoutService/GetPurchase",
        &[PO, AD, SV],
    ),
    (
        "loyalty.promotion.v1.CheckoutService/ListPurchases",
        &[AP, AD, SV],
    ),
    (
        "loyalty.promotion.v1.CheckoutService/ReplayPurchaseEvents",
        &[SV],
    ),
    (
        "loyalty.promotion.v1.ProgramService/GetProgram",
        &[PO, AP, AD, AN, SV],
    ),
    ("loyalty.promotion.v1.ProgramService/UpdateProgram", &[AD]),
    (
        "loyalty.promotion.v1.ProgramService/GetMemberTier",
        &[PO, AP, AD, SV],
    ),
    ("loyalty.promotion.v1.CatalogService/UpsertStores", &[AD]),
    (
        "loyalty.promotion.v1.CatalogService/ListStores",
        &[PO, AD, AN, SV],
    ),
    ("loyalty.promotion.v1.CatalogService/UpsertProducts", &[AD]),
    (
        "loyalty.promotion.v1.CatalogService/ListProducts",
        &[PO, AD, AN, SV],
    ),
    ("loyalty.promotion.v1.CampaignService/CreateCampaign", &[AD]),
    ("loyalty.promotion.v1.CampaignService/UpdateCampaign", &[AD]),
    (
        "loyalty.promotion.v1.CampaignService/GetCampaign",
        &[AD, AN],
    ),
    (
        "loyalty.promotion.v1.CampaignService/ListCampaigns",
        &[AD, AN],
    ),
    (
        "loyalty.promotion.v1.CampaignService/ArchiveCampaign",
        &[AD],
    ),
    (
        "loyalty.promotion.v1.CampaignService/UpsertStackingGroup",
        &[AD],
    ),
    (
        "loyalty.promotion.v1.CampaignService/GenerateCoupons",
        &[AD],
    ),
    ("loyalty.promotion.v1.CampaignService/GetCoupon", &[PO, AD]),
    (
        "loyalty.promotion.v1.CampaignService/ExportCampaigns",
        &[AD, AN],
    ),
    (
        "loyalty.promotion.v1.CampaignService/ImportCampaigns",
        &[AD],
    ),
    (
        "loyalty.promotion.v1.CampaignService/ListCampaignVersions",
        &[AD, AN],
    ),
    (
        "loyalty.promotion.v1.CampaignService/ListStackingGroups",
        &[AD, AN],
    ),
    // Reporting: no personal data, so analysts see all of it.
    ("loyalty.reporting.v1.ReportingService/GetKpis", &[AD, AN]),
    (
        "loyalty.reporting.v1.ReportingService/GetTimeSeries",
        &[AD, AN],
    ),
    (
        "loyalty.reporting.v1.ReportingService/GetCategoryIntersection",
        &[AD, AN],
    ),
    (
        "loyalty.reporting.v1.ReportingService/GetRfmOverview",
        &[AD, AN],
    ),
    (
        "loyalty.reporting.v1.ReportingService/GetCampaignUplift",
        &[AD, AN],
    ),
    (
        "loyalty.reporting.v1.ReportingService/ExportFacts",
        &[AD, AN],
    ),
    (
        "loyalty.reporting.v1.ReportingService/GetFraudSignals",
        &[AD, AN],
    ),
    // The audit log: admins only.
    ("loyalty.reporting.v1.AuditService/ListAuditRecords", &[AD]),
    (
        "loyalty.reporting.v1.AuditService/ExportAuditRecords",
        &[AD],
    ),
    // Segmentation.
    (
        "loyalty.segmentation.v1.SegmentationService/CreateSegment",
        &[AD],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/UpdateSegment",
        &[AD],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/GetSegment",
        &[AD, AN],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/ListSegments",
        &[AD, AN],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/DeleteSegment",
        &[AD],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/UploadSegmentMembers",
        &[AD],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/GetMemberSegments",
        &[PO, AP, AD, SV],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/CountSegmentMembers",
        &[AD, AN],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/StreamSegmentMembers",
        &[AD, SV],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/GetMembershipHistory",
        &[AD, AN, SV],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/GetMemberFeatures",
        &[AD, AN, SV],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/GetMemberRfm",
        &[AD, AN, SV],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/RecomputeRfm",
        &[AD],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/PreviewSegment",
        &[AD, AN],
    ),
    (
        "loyalty.segmentation.v1.SegmentationService/ExplainMembership",
        &[AD, AN],
    ),
];

/// RPCs that change nothing. Every other RPC an admin may call is audited when an admin
/// calls it ([`crate::audit`]); a new RPC is therefore audited unless it is listed here.
pub const READS: &[&str] = &[
    "loyalty.identity.v1.MemberService/GetMember",
    "loyalty.identity.v1.MemberService/LookupMember",
    "loyalty.identity.v1.MemberService/ListMembers",
    "loyalty.identity.v1.MemberService/ReplayMemberEvents",
    "loyalty.identity.v1.CardService/GetCard",
    "loyalty.identity.v1.ReferralService/ResolveReferralCode",
    "loyalty.identity.v1.AccessService/ListApiKeys",
    "loyalty.identity.v1.AccessService/VerifyApiKey",
    "loyalty.balance.v1.BalanceService/GetBalance",
    "loyalty.balance.v1.BalanceService/ListLedgerEntries",
    "loyalty.balance.v1.BalanceService/GetHold",
    "loyalty.balance.v1.BalanceService/ReplayLedgerEvents",
    "loyalty.balance.v1.GiftCertificateService/GetCertificate",
    "loyalty.promotion.v1.CheckoutService/Quote",
    "loyalty.promotion.v1.CheckoutService/GetPurchase",
    "loyalty.promotion.v1.CheckoutService/ListPurchases",
    "loyalty.promotion.v1.CheckoutService/ReplayPurchaseEvents",
    "loyalty.promotion.v1.ProgramService/GetProgram",
    "loyalty.promotion.v1.ProgramService/GetMemberTier",
    "loyalty.promotion.v1.CatalogService/ListStores",
    "loyalty.promotion.v1.CatalogService/ListProducts",
    "loyalty.promotion.v1.CampaignService/GetCampaign",
    "loyalty.promotion.v1.CampaignService/ListCampaigns",
    "loyalty.promotion.v1.CampaignService/GetCoupon",
    "loyalty.promotion.v1.CampaignService/ExportCampaigns",
    "loyalty.promotion.v1.CampaignService/ListCampaignVersions",
    "loyalty.promotion.v1.CampaignService/ListStackingGroups",
    "loyalty.reporting.v1.ReportingService/GetKpis",
    "loyalty.reporting.v1.ReportingService/GetTimeSeries",
    "loyalty.reporting.v1.ReportingService/GetCategoryIntersection",
    "loyalty.reporting.v1.ReportingService/GetRfmOverview",
    "loyalty.reporting.v1.ReportingService/GetCampaignUplift",
    "loyalty.reporting.v1.ReportingService/ExportFacts",
    "loyalty.reporting.v1.ReportingService/GetFraudSignals",
    "loyalty.reporting.v1.AuditService/ListAuditRecords",
    "loyalty.reporting.v1.AuditService/ExportAuditRecords",
    "loyalty.segmentation.v1.SegmentationService/GetSegment",
    "loyalty.segmentation.v1.SegmentationService/ListSegments",
    "loyalty.segmentation.v1.SegmentationService/GetMemberSegments",
    "loyalty.segmentation.v1.SegmentationService/CountSegmentMembers",
    "loyalty.segmentation.v1.SegmentationService/StreamSegmentMembers",
    "loyalty.segmentation.v1.SegmentationService/GetMembershipHistory",
    "loyalty.segmentation.v1.SegmentationService/GetMemberFeatures",
    "loyalty.segmentation.v1.SegmentationService/GetMemberRfm",
    "loyalty.segmentation.v1.SegmentationService/PreviewSegment",
    "loyalty.segmentation.v1.SegmentationService/ExplainMembership",
];

/// RPCs open to apps that name no member: they hold no member's data.
pub const APP_WITHOUT_MEMBER: &[&str] = &["/RegisterMember", "/GetProgram", "/ResolveReferralCode"];

/// Arrow Flight, beside the reporting API: the ticket names the tenant, so the handler
/// checks it against the caller (see [`super::admit_tenant`]).
pub const FLIGHT_PREFIX: &str = "/arrow.flight.protocol.FlightService/";

/// Roles of the Flight methods: the export is reporting's.
pub const FLIGHT_ROLES: &[Role] = &[AD, AN];

/// Field numbers from the request message down to a string field.
pub type FieldPath = Vec<u32>;

/// What the gate knows of one RPC.
#[derive(Debug, Clone, Default)]
pub struct MethodRule {
    pub roles: &'static [Role],
    /// Where the request names its tenant; `None`: the handler checks it.
    pub tenant: Option<FieldPath>,
    pub store: Option<FieldPath>,
    pub member: Option<FieldPath>,
    /// The RPC changes something and admins may call it: an admin's call is audited.
    pub audited: bool,
}

/// Every RPC's rule, by path (`/package.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: HashMap<String, Arc<MethodRule>>,
    flight: Arc<MethodRule>,
}

impl Policy {
    /// The policy of the loyalty API.
    pub fn loyalty() -> anyhow::Result<Self> {
        Self::from_descriptors(loyalty_proto::FILE_DESCRIPTOR_SET, RULES)
    }

    /// Builds the rules from an encoded descriptor set, refusing an RPC without roles and
    /// roles for an RPC that does not exist.
    pub fn from_descriptors(
        encoded: &[u8],
        rules: &[(&str, &'static [Role])],
    ) -> anyhow::Result<Self> {
        let set = FileDescriptorSet::decode(encoded)?;
        let messages = messages(&set);
        let declared: HashMap<&str, &'static [Role]> = rules.iter().copied().collect();
        anyhow::ensure!(declared.len() == rules.len(), "an RPC is listed twice");
        let mut out = HashMap::new();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let name = format!("{package}.{}/{}", service.name(), method.name());
                    let roles = declared
                        .get(name.as_str())
                        .copied()
                        .ok_or_else(|| anyhow::anyhow!("{name} declares no roles"))?;
                    let input = method.input_type().trim_start_matches('.');
                    let rule = MethodRule {
                        roles,
                        tenant: path_to(&messages, input, "tenant_id"),
                        store: path_to(&messages, input, "store_id"),
                        member: path_to(&messages, input, "member_id"),
                        audited: roles.contains(&Role::Admin) && !READS.contains(&name.as_str()),
                    };
                    out.insert(format!("/{name}"), Arc::new(rule));
                }
            }
        }
        for name in READS {
            anyhow::ensure!(
                declared.contains_key(name),
                "{name} is listed as a read but the API does not have it"
            );
        }
        for name in declared.keys() {
            anyhow::ensure!(
                out.contains_key(&format!("/{name}")),
                "roles are declared for {name}, which the API does not have"
            );
        }
        Ok(Self {
            rules: out,
            flight: Arc::new(MethodRule {
                roles: FLIGHT_ROLES,
                ..MethodRule::default()
            }),
        })
    }

    /// The rule of the RPC at `path`; Flight methods get the export's roles and no paths.
    pub fn rule(&self, path: &str) -> Option<Arc<MethodRule>> {
        if let Some(rule) = self.rules.get(path) {
            return Some(rule.clone());
        }
        path.starts_with(FLIGHT_PREFIX).then(|| self.flight.clone())
    }

    /// Every RPC path with its rule, for tests that walk the whole API.
    pub fn rules(&self) -> impl Iterator<Item = (&str, &MethodRule)> {
        self.rules.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }
}

/// Every message of the set by full name (without the leading dot), nested ones included.
fn messages(set: &FileDescriptorSet) -> HashMap<String, DescriptorProto> {
    fn walk(prefix: &str, m: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", m.name());
        for nested in &m.nested_type {
            walk(&name, nested, out);
        }
        out.insert(name, m.clone());
    }
    let mut out = HashMap::new();
    for file in &set.file {
        for m in &file.message_type {
            walk(file.package(), m, &mut out);
        }
    }
    out
}

/// The shallowest path from `message` to a singular string field called `field`, through
/// singular message fields, at most three levels down. Repeated fields are not followed: a
/// list of stores is not "the" store of a request.
fn path_to(
    messages: &HashMap<String, DescriptorProto>,
    message: &str,
    field: &str,
) -> Option<FieldPath> {
    use prost_types::field_descriptor_proto::Label;
    let mut frontier: Vec<(String, FieldPath)> = vec![(message.to_string(), Vec::new())];
    for _ in 0..3 {
        let mut next = Vec::new();
        for (name, path) in &frontier {
            let Some(m) = messages.get(name) else {
                continue;
            };
            for f in &m.field {
                if f.label() == Label::Repeated {
                    continue;
                }
                let mut here = path.clone();
                here.push(u32::try_from(f.number()).unwrap_or(0));
                if f.name() == field && f.r#type() == Type::String {
                    return Some(here);
                }
                if f.r#type() == Type::Message {
                    next.push((f.type_name().trim_start_matches('.').to_string(), here));
                }
            }
        }
        frontier = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_api_declares_its_roles_and_names_its_tenant() {
        let policy = Policy::loyalty().unwrap();
        assert_eq!(policy.rules().count(), RULES.len());
        for (path, rule) in policy.rules() {
            assert!(!rule.roles.is_empty(), "{path}");
            // A call that names no tenant (VerifyApiKey, made before a tenant is known; the
            // replays, which read every tenant) is our own services' alone.
            if rule.tenant.is_none() {
                assert_eq!(rule.roles, [Role::Service], "{path} names no tenant");
            }
            // A member's app may only call what names the member, or what holds no
            // member's data.
            if rule.roles.contains(&Role::App)
                && !APP_WITHOUT_MEMBER.iter().any(|m| path.ends_with(m))
            {
                assert!(
                    rule.member.is_some(),
                    "{path} is open to apps but names no member"
                );
            }
        }
        // Admins' changes are audited; reads and calls admins may not make are not.
        let audited = |path: &str| policy.rule(path).unwrap().audited;
        assert!(audited("/loyalty.balance.v1.BalanceService/Adjust"));
        assert!(audited(
            "/loyalty.promotion.v1.ProgramService/UpdateProgram"
        ));
        assert!(audited("/loyalty.identity.v1.AccessService/CreateApiKey"));
        assert!(!audited("/loyalty.balance.v1.BalanceService/GetBalance"));
        assert!(!audited("/loyalty.promotion.v1.CheckoutService/Commit"));
        // Nested: a quote names its tenant and store inside the receipt.
        let quote = policy
            .rule("/loyalty.promotion.v1.CheckoutService/Quote")
            .unwrap();
        assert_eq!(quote.tenant.as_ref().map(Vec::len), Some(2));
        assert!(quote.store.is_some());
    }

    #[test]
    fn an_undeclared_rpc_or_a_stale_rule_is_refused() {
        let missing = &RULES[1..];
        assert!(
            Policy::from_descriptors(loyalty_proto::FILE_DESCRIPTOR_SET, missing)
                .unwrap_err()
                .to_string()
                .contains("declares no roles")
        );
        let mut extra = RULES.to_vec();
        extra.push(("loyalty.identity.v1.MemberService/Nope", &[Role::Admin]));
        assert!(
            Policy::from_descriptors(loyalty_proto::FILE_DESCRIPTOR_SET, &extra)
                .unwrap_err()
                .to_string()
                .contains("does not have")
        );
    }
}
