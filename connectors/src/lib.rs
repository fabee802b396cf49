//! custos connectors: record sources (mail, chat, social, CRM).
//!
//! Empty for now. The connector framework issue adds here the `Connector`
//! trait, the normalized `Record` model, one module per source and the shared
//! HTTP client. Until then custos backs up directory sources only
//! (`type = "directory"` in the config).
#![forbid(unsafe_code)]
