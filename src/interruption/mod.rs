//! AWS interruption events: parsing (pure) and SQS intake.
pub mod events;
pub mod sqs;
