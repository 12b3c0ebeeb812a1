//! The gRPC edge of the error vocabulary: domain errors to statuses (exhaustively, with
//! internal details masked) and, for service-to-service calls, statuses back to errors.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{Error, FieldViolation};

/// Maps a domain error to a gRPC status. Internal errors are logged here, once, and the
/// client sees only "internal error".
pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument(violations) => {
            let summary = violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect::<Vec<_>>()
                .join("; ");
            let mut details = ErrorDetails::new();
            for v in &violations {
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
            }
            Status::with_error_details(
                Code::InvalidArgument,
                format!("invalid request: {summary}"),
                details,
            )
        }
        Error::NotFound(msg) => Status::not_found(msg),
        Error::AlreadyExists(msg) => Status::already_exists(msg),
        Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
        Error::Unimplemented(msg) => Status::unimplemented(msg),
        Error::Unavailable(msg) => Status::unavailable(msg),
        Error::Internal(e) => {
            tracing::error!(error = %format!("{e:#}"), "internal error");
            Status::internal("internal error")
        }
    }
}

/// Maps a status received from a peer service back to a domain error, keeping field
/// violations, so an in-process and a remote peer look the same to the caller.
pub fn from_status(status: Status) -> Error {
    let msg = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => {
            let details = status.get_error_details();
            let violations: Vec<_> = details
                .bad_request()
                .map(|br| {
                    br.field_violations
                        .iter()
                        .map(|v| FieldViolation {
                            field: v.field.clone(),
                            description: v.description.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            if violations.is_empty() {
                Error::invalid("request", msg)
            } else {
                Error::InvalidArgument(violations)
            }
        }
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::FailedPrecondition | Code::OutOfRange | Code::Aborted => {
            Error::FailedPrecondition(msg)
        }
        Code::Unimplemented => Error::Unimplemented(msg),
        // A connection that breaks mid-call (a peer pod killed, a reset stream) reaches the
        // client as UNKNOWN: as passing as a refused connection.
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Unknown => {
            // Transport text names hosts and addresses: log it, never forward it.
            tracing::warn!(code = ?status.code(), detail = %msg, "peer service unavailable");
            Error::Unavailable("a service this call depends on is unavailable; retry".into())
        }
        Code::Ok
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Internal
        | Code::DataLoss => {
            Error::internal(anyhow::anyhow!("peer returned {:?}: {msg}", status.code()))
        }
    }
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf timestamp as milliseconds since the epoch (sub-millisecond part dropped).
pub fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000) + i64::from(ts.nanos) / 1_000_000
}

/// The domain channel of a protobuf channel value.
pub fn channel(value: i32) -> crate::types::Channel {
    use crate::types::Channel;
    use loyalty_proto::common::v1::Channel as Pb;
    match Pb::try_from(value).unwrap_or(Pb::Unspecified) {
        Pb::Unspecified => Channel::Unspecified,
        Pb::Store => Channel::Store,
        Pb::Online => Channel::Online,
        Pb::App => Channel::App,
        Pb::CallCenter => Channel::CallCenter,
        Pb::Admin => Channel::Admin,
    }
}

/// The protobuf value of a domain channel.
pub fn channel_to_proto(c: crate::types::Channel) -> i32 {
    use crate::types::Channel;
    use loyalty_proto::common::v1::Channel as Pb;
    let pb = match c {
        Channel::Unspecified => Pb::Unspecified,
        Channel::Store => Pb::Store,
        Channel::Online => Pb::Online,
        Channel::App => Pb::App,
        Channel::CallCenter => Pb::CallCenter,
        Channel::Admin => Pb::Admin,
    };
    pb as i32
}

/// The UNIMPLEMENTED answer of an RPC whose implementation comes later.
pub fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is part of API v1 but not implemented yet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations_both_ways() {
        let err = Error::InvalidArgument(vec![FieldViolation {
            field: "phone".into(),
            description: "not a valid phone number".into(),
        }]);
        let status = to_status(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let br = details.bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "phone");
        match from_status(status) {
            Error::InvalidArgument(v) => assert_eq!(v[0].description, "not a valid phone number"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn internal_details_never_reach_the_client() {
        let status = to_status(Error::internal(anyhow::anyhow!("disk /var/x failed")));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn every_domain_error_has_its_code() {
        let cases = [
            (Error::NotFound("m".into()), Code::NotFound),
            (Error::AlreadyExists("m".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("m".into()),
                Code::FailedPrecondition,
            ),
            (Error::Unimplemented("m".into()), Code::Unimplemented),
            (Error::Unavailable("m".into()), Code::Unavailable),
        ];
        for (err, code) in cases {
            let status = to_status(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "m");
        }
    }

    /// A peer whose connection broke mid-call (UNKNOWN on the client) is passing, like one
    /// that refused the connection; a peer's own internal error is not.
    #[test]
    fn a_broken_peer_call_is_retryable() {
        for code in [Code::Unknown, Code::Unavailable, Code::DeadlineExceeded] {
            let err = from_status(tonic::Status::new(
                code,
                "h2 protocol error: connection reset",
            ));
            assert!(matches!(err, Error::Unavailable(_)), "{code:?}: {err:?}");
        }
        let err = from_status(tonic::Status::new(Code::Internal, "internal error"));
        assert!(matches!(err, Error::Internal(_)), "{err:?}");
    }
}
