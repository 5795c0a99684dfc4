//! DNS answers for one network's names, given on the network's gateway address.
//!
//! [`answer`] turns one query datagram into a [`Verdict`]: a reply written into the caller's
//! buffer, [`Verdict::Forward`] for a name that is not the cluster's (the caller sends the query
//! to the node's resolver, or answers with [`servfail`] when there is none), or a drop for a
//! datagram that must get no answer at all. It is sans-IO: no socket, no clock and no hidden
//! state. The counter that rotates a multi-address answer, to spread clients over tasks, is
//! passed in.
//!
//! # Names
//! Names are bare, as Docker's embedded DNS answers them: `web`, `tasks.web`, a container's netns
//! name, an alias. There is no cluster zone suffix, because containers already ask for bare names
//! and a suffix would be one more thing to configure. The cluster's names are therefore the
//! single-label names and `tasks.` followed by one label. An unknown name of that shape gets
//! NXDOMAIN. Any other unknown name (`example.com`) is forwarded, so containers still resolve the
//! outside world. Lookups ignore ASCII case, and the answer echoes the question's own spelling,
//! because resolvers that randomise case (DNS 0x20) check it.
//!
//! # Wire format and bounds
//! hickory-proto reads and writes the wire format. Its message types allocate, which is fine at
//! DNS rates, but every allocation is bounded by the datagram. There must be exactly one
//! question, and hickory caps the capacity it reserves for the record sections, so a header that
//! claims 65535 records costs nothing until the bytes are there. A reply never exceeds 512 bytes,
//! or the client's EDNS payload size capped at [`MAX_UDP_PAYLOAD`]. Answers that do not fit are
//! cut at a whole record, and TC is set (RFC 2181 §9).
//!
//! Answers carry a short [`TTL`] because tasks come and go. Negative answers carry no SOA, so
//! resolvers do not cache them (RFC 2308 §5): a name that appears is found on the next query.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};

/// The largest reply, whatever EDNS payload size the client offers. 1232 bytes fit in an IPv6
/// minimum MTU without fragmentation (the DNS flag day 2020 value).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// The largest reply to a client without EDNS (RFC 1035 §4.2.1).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// Seconds a resolver may keep an answer. It is short because a task that leaves should stop
/// being handed out within about the time the balancer takes to drop it (issue 9: 2 s).
pub const TTL: u32 = 2;

/// The longest name in wire form without its root label (RFC 1035 §3.1: 255 with it).
const MAX_KEY: usize = 254;

/// The longest label (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// The first label of the names that list a service's tasks, as in Docker.
const TASKS_LABEL: &str = "tasks";

/// What to do with one query datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The caller's `out` holds the reply: send it back to where the query came from.
    Reply,
    /// Not one of the cluster's names: send the query, unchanged, to the node's resolver and
    /// relay its answer, or, with no resolver, send what [`servfail`] writes.
    Forward,
    /// Send nothing.
    Drop(DropReason),
}

/// Why a datagram gets no answer; the caller counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a DNS header: there is no id to answer to.
    Short,
    /// A response, not a query. Answering responses could loop between two servers.
    Response,
    /// hickory could not encode the reply. This does not happen for a parsed question, whose
    /// name is at most 255 bytes and always fits in 512 bytes with the header.
    Unencodable,
}

/// Errors while building [`Names`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The name cannot be spelled in DNS. Nothing was added for it.
    #[error(
        "{0:?} is not a DNS name: it needs dot-separated labels of 1 to 63 bytes, 253 bytes in all"
    )]
    InvalidName(String),
}

/// One network's names and their addresses: an immutable snapshot that the control plane
/// builds with [`Names::builder`] and replaces whenever services, tasks or containers change.
#[derive(Debug, Default)]
pub struct Names {
    /// Key: the name in wire form, ASCII-lowercased, without the root label. Wire form rather
    /// than dotted text, so a label that contains a `.` cannot pass for two labels.
    addresses: HashMap<Box<[u8]>, Box<[Ipv4Addr]>>,
}

impl Names {
    /// An empty builder; see [`Builder`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn get(&self, key: &[u8]) -> Option<&[Ipv4Addr]> {
        self.addresses.get(key).map(|a| &**a)
    }
}

/// Collects names for a [`Names`] snapshot. Names may end with a dot or not, in any case.
/// A name added twice (two containers with the same alias, say) resolves to all of its
/// addresses.
#[derive(Debug, Default)]
pub struct Builder {
    addresses: HashMap<Box<[u8]>, Vec<Ipv4Addr>>,
}

impl Builder {
    /// A service in VIP mode: `name` resolves to `vip`, `tasks.name` to the healthy tasks.
    pub fn service_vip(
        &mut self,
        name: &str,
        vip: Ipv4Addr,
        healthy_tasks: &[Ipv4Addr],
    ) -> Result<&mut Self, Error> {
        self.service(name, &[vip], healthy_tasks)
    }

    /// A service in DNS round-robin mode: `name` and `tasks.name` both resolve to the healthy
    /// tasks.
    pub fn service_dnsrr(
        &mut self,
        name: &str,
        healthy_tasks: &[Ipv4Addr],
    ) -> Result<&mut Self, Error> {
        self.service(name, healthy_tasks, healthy_tasks)
    }

    /// A container's name: add its netns name and each of its aliases this way.
    pub fn container(&mut self, name: &str, addr: Ipv4Addr) -> Result<&mut Self, Error> {
        let key = text_key(name)?;
        self.add(key, &[addr]);
        Ok(self)
    }

    /// The snapshot. Each name's addresses come out sorted and without repeats.
    pub fn build(self) -> Names {
        let addresses = self
            .addresses
            .into_iter()
            .map(|(key, mut addrs)| {
                addrs.sort_unstable();
                addrs.dedup();
                (key, addrs.into_boxed_slice())
            })
            .collect();
        Names { addresses }
    }

    fn service(
        &mut self,
        name: &str,
        name_addrs: &[Ipv4Addr],
        healthy_tasks: &[Ipv4Addr],
    ) -> Result<&mut Self, Error> {
        // Both keys first, so that a name too long for its `tasks.` form adds nothing.
        let key = text_key(name)?;
        let tasks_key = text_key(&format!("{TASKS_LABEL}.{name}"))?;
        self.add(key, name_addrs);
        self.add(tasks_key, healthy_tasks);
        Ok(self)
    }

    fn add(&mut self, key: Box<[u8]>, addrs: &[Ipv4Addr]) {
        self.addresses.entry(key).or_default().extend(addrs);
    }
}

/// The lookup key of a name given as text, with or without its trailing dot.
fn text_key(name: &str) -> Result<Box<[u8]>, Error> {
    let invalid = || Error::InvalidName(name.to_owned());
    let dotless = name.strip_suffix('.').unwrap_or(name);
    let labels = dotless.split('.').map(str::as_bytes);
    if dotless.is_empty() || labels.clone().any(<[u8]>::is_empty) {
        return Err(invalid());
    }
    let mut buf = [0; MAX_KEY];
    wire_key(labels, &mut buf)
        .map(Box::from)
        .ok_or_else(invalid)
}

/// Writes `labels` into `buf` in wire form (a length byte, then the label), ASCII-lowercased,
/// without the root label. None if a label or the whole name is too long.
fn wire_key<'a, 'b>(
    labels: impl Iterator<Item = &'a [u8]>,
    buf: &'b mut [u8; MAX_KEY],
) -> Option<&'b [u8]> {
    let mut len = 0;
    for label in labels {
        if label.len() > MAX_LABEL {
            return None;
        }
        *buf.get_mut(len)? = u8::try_from(label.len()).ok()?;
        let dst = buf.get_mut(len + 1..len + 1 + label.len())?;
        for (d, s) in dst.iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        len += 1 + label.len();
    }
    buf.get(..len)
}

/// Whether an unknown `name` is still the cluster's to deny: one label, or `tasks.` and one.
fn is_cluster_shaped(name: &Name) -> bool {
    let mut labels = name.iter();
    match (labels.next(), labels.next(), labels.next()) {
        (Some(_), None, None) => true,
        (Some(first), Some(_), None) => first.eq_ignore_ascii_case(TASKS_LABEL.as_bytes()),
        _ => false,
    }
}

/// Answers `query` from `names` into `out` (cleared first; its capacity is reused). `rotation`
/// picks which address comes first when a name has several: pass a counter that changes from
/// query to query.
///
/// - A or ANY (class IN) for a known name: its addresses, authoritative.
/// - Any other type or class for a known name: an empty NOERROR (NODATA), so a client asking
///   A and AAAA together does not give up on the name.
/// - An unknown name of the cluster's shape (see the module docs): NXDOMAIN.
/// - Any other name: [`Verdict::Forward`].
/// - A malformed query: FORMERR; an opcode other than QUERY: NOTIMP; EDNS other than version 0:
///   BADVERS. Too short for a header, or a response: [`Verdict::Drop`].
pub fn answer(query: &[u8], names: &Names, rotation: usize, out: &mut Vec<u8>) -> Verdict {
    out.clear();
    let request = match Request::parse(query) {
        Ok(request) => request,
        Err(refusal) => return refusal.reply(out),
    };
    if request.bad_version() {
        return request.reply(ResponseCode::BADVERS, &[], 0, out);
    }
    let mut buf = [0; MAX_KEY];
    let name = request.question.name();
    match wire_key(name.iter(), &mut buf).and_then(|key| names.get(key)) {
        Some(addrs) => {
            let wanted = request.question.query_class() == DNSClass::IN
                && matches!(
                    request.question.query_type(),
                    RecordType::A | RecordType::ANY
                );
            let addrs = if wanted { addrs } else { &[] };
            request.reply(ResponseCode::NoError, addrs, rotation, out)
        }
        None if is_cluster_shaped(name) => request.reply(ResponseCode::NXDomain, &[], 0, out),
        None => Verdict::Forward,
    }
}

/// Writes a SERVFAIL reply to `query` into `out`: the answer to a [`Verdict::Forward`] when the
/// node has no resolver, or when the resolver does not answer. A query that [`answer`] would
/// refuse gets the same refusal here.
pub fn servfail(query: &[u8], out: &mut Vec<u8>) -> Verdict {
    out.clear();
    match Request::parse(query) {
        Ok(request) => request.reply(ResponseCode::ServFail, &[], 0, out),
        Err(refusal) => refusal.reply(out),
    }
}

/// A well-formed standard query.
struct Request {
    header: Metadata,
    question: Query,
    edns: Option<Edns>,
}

/// A datagram that is not a well-formed standard query.
enum Refusal {
    Drop(DropReason),
    /// Reply with this code and no question: the question could not be read, or has another
    /// format under this opcode.
    Reply(Metadata, ResponseCode),
}

impl Request {
    fn parse(bytes: &[u8]) -> Result<Self, Refusal> {
        let mut decoder = BinDecoder::new(bytes);
        let Header {
            metadata: header,
            counts,
        } = Header::read(&mut decoder).map_err(|_| Refusal::Drop(DropReason::Short))?;
        let refuse = |code| Refusal::Reply(header, code);
        if header.message_type == MessageType::Response {
            return Err(Refusal::Drop(DropReason::Response));
        }
        if header.op_code != OpCode::Query {
            return Err(refuse(ResponseCode::NotImp));
        }
        // RFC 9619: a standard query carries exactly one question.
        if counts.queries != 1 {
            return Err(refuse(ResponseCode::FormErr));
        }
        let formerr = |_| refuse(ResponseCode::FormErr);
        let question = Query::read(&mut decoder).map_err(formerr)?;
        // The sections after the question are read only to find the OPT record (and to
        // reject a malformed one). read_records reserves at most 8 records ahead; each one
        // it reads has consumed bytes of the datagram.
        let op = header.op_code;
        Message::read_records(&mut decoder, counts.answers.into(), false, op).map_err(formerr)?;
        Message::read_records(&mut decoder, counts.authorities.into(), false, op)
            .map_err(formerr)?;
        let (_, edns, _) = Message::read_records(&mut decoder, counts.additionals.into(), true, op)
            .map_err(formerr)?;
        if !decoder.is_empty() {
            return Err(refuse(ResponseCode::FormErr));
        }
        Ok(Self {
            header,
            question,
            edns,
        })
    }

    /// RFC 6891 §6.1.3: only EDNS version 0 exists.
    fn bad_version(&self) -> bool {
        self.edns.as_ref().is_some_and(|e| e.version() != 0)
    }

    /// The reply with the question, `addrs` as A records starting at `rotation`, and an OPT
    /// record if the query had one (RFC 6891 §6.1.1).
    fn reply(
        &self,
        code: ResponseCode,
        addrs: &[Ipv4Addr],
        rotation: usize,
        out: &mut Vec<u8>,
    ) -> Verdict {
        let mut message = response(&self.header, code);
        // Ours are the final word on the cluster's names; errors are not.
        message.metadata.authoritative =
            matches!(code, ResponseCode::NoError | ResponseCode::NXDomain);
        message.add_query(self.question.clone());
        let first = rotation.checked_rem(addrs.len()).unwrap_or(0);
        let rotated = addrs.iter().cycle().skip(first).take(addrs.len());
        let name = self.question.name();
        message
            .add_answers(rotated.map(|a| Record::from_rdata(name.clone(), TTL, RData::A(A(*a)))));
        let limit = match &self.edns {
            Some(edns) => {
                let mut ours = Edns::new();
                ours.set_max_payload(MAX_UDP_PAYLOAD);
                message.set_edns(ours);
                edns.max_payload()
                    .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)
            }
            None => CLASSIC_UDP_PAYLOAD,
        };
        emit(&message, limit, out)
    }
}

impl Refusal {
    fn reply(self, out: &mut Vec<u8>) -> Verdict {
        match self {
            Self::Drop(reason) => Verdict::Drop(reason),
            Self::Reply(header, code) => emit(&response(&header, code), CLASSIC_UDP_PAYLOAD, out),
        }
    }
}

/// A reply to a query with this header: same id, opcode, RD and CD (RFC 6895 §2). RA is set
/// because names outside the cluster are resolved through the node's resolver.
fn response(query: &Metadata, code: ResponseCode) -> Message {
    let mut message = Message::response(query.id, query.op_code);
    message.metadata = Metadata::response_from_request(query);
    message.metadata.recursion_available = true;
    message.metadata.response_code = code;
    message
}

/// Encodes `message` into `out` within `limit` bytes; hickory leaves out the records that do
/// not fit, whole, and sets TC.
fn emit(message: &Message, limit: u16, out: &mut Vec<u8>) -> Verdict {
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(limit);
    match message.emit(&mut encoder) {
        Ok(()) => Verdict::Reply,
        Err(_) => {
            out.clear();
            Verdict::Drop(DropReason::Unencodable)
        }
    }
}

#[cfg(test)]
mod tests;
