//! The loyalty API v1: prost messages and tonic clients/servers generated from `proto/`.
//!
//! Only gRPC adapters and clients use this crate; domain cores never see prost types.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Encoded `FileDescriptorSet` of every API file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/loyalty_descriptor.bin"));

pub mod common {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.common.v1.rs"));
    }
}
pub mod identity {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.identity.v1.rs"));
    }
}
pub mod balance {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.balance.v1.rs"));
    }
}
pub mod promotion {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.promotion.v1.rs"));
    }
}
pub mod segmentation {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.segmentation.v1.rs"));
    }
}
pub mod reporting {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.reporting.v1.rs"));
    }
}
pub mod events {
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/loyalty.events.v1.rs"));
    }
}
