//! A restricted unpickler for the `data.pkl` of PyTorch checkpoints.
//!
//! It interprets the pickle opcodes itself and never runs code from the file: the only
//! globals it accepts are the ones `torch.save` writes for a state dict (the tensor
//! rebuilders of `torch._utils`, the `torch.*Storage` dtype tags and `collections.OrderedDict`),
//! and each of them is turned into plain data here, not called. Any other global (`os.system`,
//! `builtins.eval`, a class to instantiate, ...) is refused with an error that names it, before
//! anything else in the file is looked at. Storages are not read: a tensor comes back as a
//! [`TensorRef`] (storage key, dtype, offset, size, stride) for the caller to slice from the
//! archive.
//!
//! The file may be hostile, so every opcode does work and allocates memory in proportion to the
//! bytes it reads, never more: strings and containers are reference-counted (DUP and memo
//! references copy a pointer, not a string), the only opcode that copies a container (REDUCE of
//! `OrderedDict` over a list of pairs) and every other allocation are charged to a budget of
//! [`ALLOC_PER_BYTE`] bytes per byte of input, and the stack, the memo and the nesting of
//! containers are capped by [`crate::limits`]. A pickle may make a container hold itself (through
//! the memo): nothing here walks values recursively, and [`Unpickled`] empties every container it
//! made when it is dropped, so such cycles are freed too.
use crate::limits::{MAX_PICKLE_DEPTH, MAX_PICKLE_MEMO, MAX_PICKLE_STACK, MAX_TENSOR_DIMS};
use crate::{Error, Result};
use std::cell::{Cell, Ref, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use tch::Kind;

/// Bytes the unpickler may allocate per byte of `data.pkl` (counted as allocated, never given
/// back, so it bounds time as well as memory). `torch.save` of a state dict needs 12 to 16: each
/// tensor's ~110 bytes of pickle become a key, storage and tensor records, argument tuples and
/// a memo entry for nearly every object. 48 leaves three times that and stays a small multiple
/// of the file.
pub const ALLOC_PER_BYTE: u64 = 48;

/// Allocation allowed on top of [`ALLOC_PER_BYTE`], so that tiny pickles are not squeezed.
pub const ALLOC_SLACK: u64 = 1 << 20;

/// What one value of each kind costs in the allocation budget: the value itself, and for a
/// container its shared header.
const VALUE_COST: u64 = std::mem::size_of::<Value>() as u64;
/// A container's or record's own allocation (its reference-counted box, rounded up to the
/// allocator's chunk) and its entry in [`Containers`].
const CONTAINER_COST: u64 = 64;
/// One slot of memo capacity: a hash table entry (32 bytes and a control byte) at the table's
/// lowest load (7/8), and the old table alive next to the new one while it grows.
const MEMO_SLOT_COST: u64 = 64;

/// A persistent storage of the archive (`data/<key>`), typed by the `torch.*Storage` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: Rc<str>,
    pub kind: Kind,
    /// Number of elements as recorded in the pickle (bytes for untyped storages).
    pub numel: i64,
}

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it: a strided view of a storage.
/// The numbers are as the file wrote them (at most [`MAX_TENSOR_DIMS`] dimensions, but possibly
/// negative or overflowing): the caller checks them against the storage, naming the tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// Offset into the storage, in elements.
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// The globals this unpickler accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Global {
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    StorageType(Kind),
}

/// An immutable tuple, with the nesting depth it was built with.
pub struct Tuple {
    items: Vec<Value>,
    depth: usize,
}

/// A list (or a set, kept as a list), with the deepest nesting anything appended to it had.
pub struct List {
    items: RefCell<Vec<Value>>,
    depth: Cell<usize>,
}

/// A dict (or `OrderedDict`): its entries in insertion order, repeated keys included.
pub struct Dict {
    items: RefCell<Vec<(Value, Value)>>,
    depth: Cell<usize>,
}

impl Tuple {
    pub fn items(&self) -> &[Value] {
        &self.items
    }
}

impl List {
    pub fn items(&self) -> Ref<'_, Vec<Value>> {
        self.items.borrow()
    }
}

impl Dict {
    pub fn items(&self) -> Ref<'_, Vec<(Value, Value)>> {
        self.items.borrow()
    }
}

// Containers print shallowly: a pickle can make one contain itself.
impl std::fmt::Debug for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tuple(len {})", self.items.len())
    }
}

impl std::fmt::Debug for List {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.items.try_borrow() {
            Ok(items) => write!(f, "List(len {})", items.len()),
            Err(_) => write!(f, "List(borrowed)"),
        }
    }
}

impl std::fmt::Debug for Dict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.items.try_borrow() {
            Ok(items) => write!(f, "Dict(len {})", items.len()),
            Err(_) => write!(f, "Dict(borrowed)"),
        }
    }
}

/// The plain values a checkpoint's pickle may hold. Cloning one is O(1).
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64`, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Tuple>),
    List(Rc<List>),
    Dict(Rc<Dict>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The entry `key` of a dict value (the last one if the pickle set it more than once).
    pub fn get(&self, key: &str) -> Option<Value> {
        match self {
            Value::Dict(d) => d
                .items()
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
        }
    }

    /// Nesting depth of containers, as built: 0 for a scalar, 1 for a container of scalars.
    /// A list or dict changed after it was put in another container (possible only through
    /// the memo) does not update its container's depth, so this bounds how deep the pickle
    /// nested what it built, not what a cyclic value looks like; nothing walks values
    /// recursively.
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(t) => t.depth,
            Value::List(l) => l.depth.get(),
            Value::Dict(d) => d.depth.get(),
            _ => 0,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Values are dropped without recursion: the children of a container this value owns alone
/// are moved to a work list first, so that deeply nested containers cannot overflow the stack
/// when they are freed.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

fn take_children(v: &mut Value, work: &mut Vec<Value>) {
    match v {
        Value::List(l) if Rc::strong_count(l) == 1 => {
            work.append(&mut l.items.borrow_mut());
        }
        Value::Dict(d) if Rc::strong_count(d) == 1 => {
            for (k, x) in std::mem::take(&mut *d.items.borrow_mut()) {
                work.push(k);
                work.push(x);
            }
        }
        Value::Tuple(t) => {
            if let Some(t) = Rc::get_mut(t) {
                work.append(&mut t.items);
            }
        }
        _ => {}
    }
}

/// Every list and dict an unpickling made. They are the only values that can form cycles (a
/// tuple is complete before anything can refer to it); emptying them all when the result is
/// dropped frees those cycles.
#[derive(Default)]
struct Containers {
    lists: Vec<Weak<List>>,
    dicts: Vec<Weak<Dict>>,
}

impl Drop for Containers {
    fn drop(&mut self) {
        for l in self.lists.drain(..) {
            if let Some(l) = l.upgrade() {
                let items = std::mem::take(&mut *l.items.borrow_mut());
                drop(items);
            }
        }
        for d in self.dicts.drain(..) {
            if let Some(d) = d.upgrade() {
                let items = std::mem::take(&mut *d.items.borrow_mut());
                drop(items);
            }
        }
    }
}

/// The object a pickle describes. Dropping it empties every list and dict the pickle made,
/// also those still referred to by clones taken from it: take out what you need (tensor
/// references, numbers, strings) before dropping it.
pub struct Unpickled {
    root: Value,
    allocated: u64,
    _containers: Containers,
}

impl Unpickled {
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Bytes the unpickling charged to its budget (see [`ALLOC_PER_BYTE`]).
    pub fn allocated(&self) -> u64 {
        self.allocated
    }
}

impl std::ops::Deref for Unpickled {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.root
    }
}

impl std::fmt::Debug for Unpickled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.root.fmt(f)
    }
}

/// What `GLOBAL module name` may refer to.
fn allowed_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", storage) => Global::StorageType(storage_kind(storage)?),
        _ => return None,
    })
}

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// The values of the stack; `marks` holds the stack length at each MARK, innermost last.
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    containers: Containers,
    empty_tuple: Rc<Tuple>,
    /// Bytes still allowed to be allocated (see [`ALLOC_PER_BYTE`]).
    budget: u64,
    /// The budget at the start, for messages.
    allowed: u64,
    /// The file, for error messages.
    source: &'a str,
}

/// Unpickles `data` (the `data.pkl` of a checkpoint called `source` in messages).
pub fn unpickle(data: &[u8], source: &str) -> Result<Unpickled> {
    let allowed = (data.len() as u64)
        .saturating_mul(ALLOC_PER_BYTE)
        .saturating_add(ALLOC_SLACK);
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        containers: Containers::default(),
        empty_tuple: Rc::new(Tuple {
            items: Vec::new(),
            depth: 1,
        }),
        budget: allowed,
        allowed,
        source,
    };
    let root = m.run()?;
    Ok(Unpickled {
        root,
        allocated: m.allowed - m.budget,
        _containers: std::mem::take(&mut m.containers),
    })
}

impl<'a> Machine<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::bad_model(format!(
            "{}: pickle data at byte {}: {msg}",
            self.source, self.pos
        ))
    }

    fn refuse(&self, what: &str) -> Error {
        Error::bad_model(format!(
            "refusing to load {what} from {}: only tensors and plain containers are allowed",
            self.source
        ))
    }

    /// Takes `bytes` from the allocation budget.
    fn charge(&mut self, bytes: u64) -> Result<()> {
        match self.budget.checked_sub(bytes) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => Err(self.err(format!(
                "the pickle builds more than {} bytes of objects ({ALLOC_PER_BYTE} per byte of \
                 data.pkl): refusing a memory bomb",
                self.allowed
            ))),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.data.len() - self.pos < n {
            return Err(self.err(format!("truncated (needs {n} more bytes)")));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len_u64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err(format!("length {n} too large")))
    }

    /// A text line (protocol 0 arguments), without the newline.
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated text argument"))?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.err("text argument is not UTF-8"))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn memo_index(&mut self) -> Result<u32> {
        let t = self.line()?;
        t.parse()
            .map_err(|_| self.err(format!("bad memo index {t:?}")))
    }

    /// A string value of `n` input bytes (`latin1`: Python 2 `str`, one char per byte).
    fn string(&mut self, n: usize, latin1: bool) -> Result<Value> {
        let bytes = self.take(n)?;
        let s: Rc<str> = if latin1 {
            self.charge(2 * n as u64 + 32)?;
            bytes.iter().map(|&b| b as char).collect::<String>().into()
        } else {
            self.charge(n as u64 + 32)?;
            std::str::from_utf8(bytes)
                .map_err(|_| self.err("string is not valid UTF-8"))?
                .into()
        };
        Ok(Value::Str(s))
    }

    /// The stack length above the innermost MARK: values below it are not this opcode's.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    /// Room for one more stack entry (value or MARK), with its memory charged as the stack
    /// grows: a stack is only charged for its deepest point.
    fn grow_stack(&mut self, mark: bool) -> Result<()> {
        if self.stack.len() + self.marks.len() >= MAX_PICKLE_STACK {
            return Err(self.err(format!(
                "the stack grows past MAX_PICKLE_STACK ({MAX_PICKLE_STACK} entries)"
            )));
        }
        let (len, cap, size) = if mark {
            (self.marks.len(), self.marks.capacity(), 8)
        } else {
            (self.stack.len(), self.stack.capacity(), VALUE_COST)
        };
        if len == cap {
            let add = cap.max(16);
            self.charge(add as u64 * size)?;
            if mark {
                self.marks.reserve_exact(add);
            } else {
                self.stack.reserve_exact(add);
            }
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<()> {
        self.grow_stack(false)?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() > self.floor() {
            Ok(self.stack.pop().expect("above the floor"))
        } else if self.marks.is_empty() {
            Err(self.err("stack underflow"))
        } else {
            Err(self.err("unexpected MARK on the stack"))
        }
    }

    fn top(&self) -> Result<&Value> {
        if self.stack.len() > self.floor() {
            Ok(self.stack.last().expect("above the floor"))
        } else {
            Err(self.err("expected a value on the stack"))
        }
    }

    /// Pops everything down to the innermost MARK (and the MARK).
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(at))
    }

    fn check_depth(&self, depth: usize) -> Result<()> {
        if depth > MAX_PICKLE_DEPTH {
            return Err(self.err(format!(
                "containers nest deeper than MAX_PICKLE_DEPTH ({MAX_PICKLE_DEPTH})"
            )));
        }
        Ok(())
    }

    fn tuple(&mut self, items: Vec<Value>) -> Result<Value> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(CONTAINER_COST + VALUE_COST * items.len() as u64)?;
        Ok(Value::Tuple(Rc::new(Tuple { items, depth })))
    }

    fn list(&mut self, items: Vec<Value>) -> Result<Value> {
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(CONTAINER_COST + VALUE_COST * items.len() as u64)?;
        let l = Rc::new(List {
            items: RefCell::new(items),
            depth: Cell::new(depth),
        });
        self.containers.lists.push(Rc::downgrade(&l));
        Ok(Value::List(l))
    }

    fn dict(&mut self) -> Result<Rc<Dict>> {
        self.charge(CONTAINER_COST)?;
        let d = Rc::new(Dict {
            items: RefCell::new(Vec::new()),
            depth: Cell::new(1),
        });
        self.containers.dicts.push(Rc::downgrade(&d));
        Ok(d)
    }

    /// Appends `items` to the list on top of the stack (APPEND, APPENDS, ADDITEMS).
    fn extend_top(&mut self, items: Vec<Value>, op: &str) -> Result<()> {
        let l = match self.top()? {
            Value::List(l) => Rc::clone(l),
            other => {
                let t = other.type_name();
                return Err(self.err(format!("{op} to a {t}")));
            }
        };
        let depth = items.iter().map(|v| v.depth() + 1).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(VALUE_COST * items.len() as u64)?;
        l.depth.set(l.depth.get().max(depth));
        l.items.borrow_mut().extend(items);
        Ok(())
    }

    fn memo_get(&self, idx: u32) -> Result<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {idx} is not defined")))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = match self.top() {
            Ok(v) => v.clone(),
            Err(_) => return Err(self.err("PUT with no value on the stack")),
        };
        if !self.memo.contains_key(&idx) {
            if self.memo.len() >= MAX_PICKLE_MEMO {
                return Err(self.err(format!(
                    "the memo grows past MAX_PICKLE_MEMO ({MAX_PICKLE_MEMO} entries)"
                )));
            }
            if self.memo.len() == self.memo.capacity() {
                let add = self.memo.capacity().max(16);
                self.charge(add as u64 * MEMO_SLOT_COST)?;
                self.memo.reserve(add);
            }
        }
        self.memo.insert(idx, v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed_global(module, name) {
            Some(g) => self.push(Value::Global(g)),
            None => Err(self.refuse(&format!("{module}.{name}"))),
        }
    }

    /// Adds `items` (key, value, key, value, ...) to `target`, which must be a dict.
    fn set_items(&mut self, target: &Value, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let Value::Dict(d) = target else {
            return Err(self.err(format!("SETITEM on a {}", target.type_name())));
        };
        let depth = items.iter().map(|v| v.depth() + 1).max().unwrap_or(0);
        self.check_depth(depth)?;
        self.charge(VALUE_COST * items.len() as u64)?;
        d.depth.set(d.depth.get().max(depth));
        // Entries are kept in order, repeated keys included: readers take the last one, as a
        // Python dict would have it (and no insertion costs a scan).
        let mut entries = d.items.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            entries.push((k, v));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unknown pickle protocol {p}")));
                    }
                }
                0x95 => {
                    // FRAME: a length prefix only
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => {
                    self.grow_stack(true)?;
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    // POP: the top value, or the innermost MARK if nothing is above it
                    if self.stack.len() > self.floor() {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return Err(self.err("POP on an empty stack"));
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64))?;
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?;
                    self.charge(n as u64 + 32)?;
                    self.push(long_value(bytes))?;
                }
                b'I' | b'L' => {
                    let text = self.line()?.trim_end_matches('L');
                    let v = match text {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => Value::Int(
                            t.parse()
                                .map_err(|_| self.err(format!("bad integer {t:?}")))?,
                        ),
                    };
                    self.push(v)?;
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)))?;
                }
                b'F' => {
                    let t = self.line()?;
                    let v = t
                        .parse()
                        .map_err(|_| self.err(format!("bad float {t:?}")))?;
                    self.push(Value::Float(v))?;
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let s = self.string(n, false)?;
                    self.push(s)?;
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 text
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let s = self.string(n, true)?;
                    self.push(s)?;
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?;
                    self.charge(n as u64 + 32)?;
                    self.push(Value::Bytes(bytes.into()))?;
                }
                b')' => {
                    // Empty tuples are all the same one, as in Python.
                    let t = Value::Tuple(Rc::clone(&self.empty_tuple));
                    self.push(t)?;
                }
                b't' | 0x91 => {
                    // TUPLE, FROZENSET (kept as a tuple)
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < self.floor() + n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                b']' | 0x8f => {
                    // EMPTY_LIST, EMPTY_SET (sets are kept as lists)
                    let l = self.list(Vec::new())?;
                    self.push(l)?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let l = self.list(items)?;
                    self.push(l)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.extend_top(vec![v], "APPEND")?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, "APPENDS")?;
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    self.extend_top(items, "ADDITEMS")?;
                }
                b'}' => {
                    let d = self.dict()?;
                    self.push(Value::Dict(d))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = Value::Dict(self.dict()?);
                    self.set_items(&dict, items)?;
                    self.push(dict)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                b'p' => {
                    let idx = self.memo_index()?;
                    self.memo_put(idx)?;
                }
                b'q' => {
                    let idx = self.u8()? as u32;
                    self.memo_put(idx)?;
                }
                b'r' => {
                    let idx = self.u32()?;
                    self.memo_put(idx)?;
                }
                0x94 => {
                    let idx = self.memo.len() as u32;
                    self.memo_put(idx)?;
                }
                b'g' => {
                    let idx = self.memo_index()?;
                    let v = self.memo_get(idx)?;
                    self.push(v)?;
                }
                b'h' => {
                    let idx = self.u8()? as u32;
                    let v = self.memo_get(idx)?;
                    self.push(v)?;
                }
                b'j' => {
                    let idx = self.u32()?;
                    let v = self.memo_get(idx)?;
                    self.push(v)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(m), Some(n)) => self.global(m, n)?,
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v)?;
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is a class we accept
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Value::Global(Global::OrderedDict) => {
                            let d = self.dict()?;
                            self.push(Value::Dict(d))?;
                        }
                        other => {
                            return Err(self.err(format!(
                                "NEWOBJ of a {}: only plain containers are allowed",
                                other.type_name()
                            )))
                        }
                    }
                }
                b'b' => {
                    // BUILD: state for the object below. Dicts (an OrderedDict's `_metadata`)
                    // and tensors keep no state here.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let t = other.type_name();
                            return Err(self.err(format!("BUILD on a {t}")));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push(v)?;
                }
                b'P' => {
                    return Err(self.err("text persistent ids (PERSID) are not PyTorch's format"))
                }
                b'i' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    return Err(self.refuse(&format!("{module}.{name}")));
                }
                b'o' => return Err(self.refuse("an object built with OBJ")),
                0x92 => return Err(self.refuse("an object built with NEWOBJ_EX")),
                0x82..=0x84 => return Err(self.refuse("a copyreg extension")),
                0x97 | 0x98 => return Err(self.refuse("an out-of-band buffer")),
                other => {
                    return Err(self.err(format!("unknown pickle opcode 0x{other:02x}")));
                }
            }
        }
    }

    /// `('storage', storage_type, key, location, numel)` as `torch.save` writes it.
    fn persistent_load(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id is a {}", pid.type_name())));
        };
        match t.items() {
            [tag, Value::Global(Global::StorageType(kind)), key, _location, numel]
                if tag.as_str() == Some("storage") =>
            {
                let key: Rc<str> = match key {
                    Value::Str(s) => Rc::clone(s),
                    Value::Int(i) => i.to_string().into(),
                    other => {
                        return Err(self.err(format!("storage key is a {}", other.type_name())))
                    }
                };
                let storage = StorageRef {
                    key,
                    kind: *kind,
                    numel: numel.as_int().unwrap_or(-1),
                };
                self.charge(CONTAINER_COST + 32)?;
                Ok(Value::Storage(Rc::new(storage)))
            }
            _ => {
                Err(self
                    .err("persistent id is not a ('storage', type, key, location, numel) tuple"))
            }
        }
    }

    fn reduce(&mut self, func: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = &args else {
            return Err(self.err(format!("REDUCE arguments are a {}", args.type_name())));
        };
        let Value::Global(g) = func else {
            return Err(self.err(format!("REDUCE of a {}", func.type_name())));
        };
        let args = args.items();
        match g {
            Global::OrderedDict => {
                let dict = Value::Dict(self.dict()?);
                if let Some(first) = args.first() {
                    // The one opcode that copies a container: `OrderedDict(pairs)` copies the
                    // pairs, which the memo can hand it again and again. The budget bounds it.
                    let flat = match first {
                        Value::List(l) => self.flatten_pairs(&l.items()),
                        Value::Tuple(t) => self.flatten_pairs(t.items()),
                        other => Err(self.err(format!("OrderedDict of a {}", other.type_name()))),
                    }?;
                    self.set_items(&dict, flat)?;
                }
                Ok(dict)
            }
            Global::RebuildTensorV2 => {
                if args.len() < 4 {
                    return Err(self.err("_rebuild_tensor_v2 with fewer than 4 arguments"));
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(
                        self.err(format!("_rebuild_tensor_v2 of a {}", args[0].type_name()))
                    );
                };
                let offset = args[1]
                    .as_int()
                    .ok_or_else(|| self.err("tensor storage offset is not an int"))?;
                let size = self.int_tuple(&args[2], "size")?;
                let stride = self.int_tuple(&args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(self.err("tensor size and stride differ in length"));
                }
                self.charge(CONTAINER_COST * 2 + 16 * size.len() as u64)?;
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: StorageRef::clone(storage),
                    offset,
                    size,
                    stride,
                })))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(self.err("_rebuild_parameter of something that is not a tensor")),
            },
            Global::StorageType(_) => Err(self.err("a storage type called as a function")),
        }
    }

    /// `[(k, v), ...]` as `[k, v, ...]`, charged to the budget before anything is copied.
    fn flatten_pairs(&mut self, pairs: &[Value]) -> Result<Vec<Value>> {
        self.charge(2 * VALUE_COST * pairs.len() as u64)?;
        let mut flat = Vec::with_capacity(2 * pairs.len());
        for p in pairs {
            match p {
                Value::Tuple(kv) if kv.items.len() == 2 => {
                    flat.push(kv.items[0].clone());
                    flat.push(kv.items[1].clone());
                }
                _ => return Err(self.err("OrderedDict item is not a pair")),
            }
        }
        Ok(flat)
    }

    /// A tensor's size or stride: at most [`MAX_TENSOR_DIMS`] integers (checked before any
    /// is looked at, so a huge memoised tuple costs nothing).
    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<i64>> {
        let list;
        let items: &[Value] = match v {
            Value::Tuple(t) => t.items(),
            Value::List(l) => {
                list = l.items();
                &list
            }
            other => {
                return Err(self.err(format!("tensor {what} is a {}", other.type_name())));
            }
        };
        if items.len() > MAX_TENSOR_DIMS {
            return Err(self.err(format!(
                "tensor {what} has {} dimensions, more than MAX_TENSOR_DIMS ({MAX_TENSOR_DIMS})",
                items.len()
            )));
        }
        items
            .iter()
            .map(|i| {
                i.as_int()
                    .ok_or_else(|| self.err(format!("tensor {what} has a non-integer entry")))
            })
            .collect()
    }
}

fn long_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut a = if negative { [0xffu8; 8] } else { [0u8; 8] };
        a[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(a))
    } else {
        Value::BigInt(bytes.into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Writes pickles opcode by opcode, numbering memo entries as it puts them.
    pub(crate) struct Builder {
        pub bytes: Vec<u8>,
        memo: u32,
    }

    impl Builder {
        pub fn new() -> Self {
            Self {
                bytes: vec![0x80, 2],
                memo: 0,
            }
        }
        pub fn op(&mut self, op: u8) -> &mut Self {
            self.bytes.push(op);
            self
        }
        pub fn ops(&mut self, ops: &[u8]) -> &mut Self {
            self.bytes.extend_from_slice(ops);
            self
        }
        pub fn str(&mut self, s: &str) -> &mut Self {
            self.bytes.push(b'X');
            self.bytes.extend((s.len() as u32).to_le_bytes());
            self.bytes.extend(s.as_bytes());
            self
        }
        pub fn int(&mut self, v: i64) -> &mut Self {
            match v {
                0..=255 => self.ops(&[b'K', v as u8]),
                256..=65535 => {
                    self.op(b'M');
                    self.ops(&(v as u16).to_le_bytes())
                }
                _ if v == v as i32 as i64 => {
                    self.op(b'J');
                    self.ops(&(v as i32).to_le_bytes())
                }
                _ => {
                    self.ops(&[0x8a, 8]);
                    self.ops(&v.to_le_bytes())
                }
            }
        }
        pub fn tuple(&mut self, items: &[i64]) -> &mut Self {
            self.op(b'(');
            for &i in items {
                self.int(i);
            }
            self.op(b't')
        }
        pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b'c');
            self.ops(format!("{module}\n{name}\n").as_bytes())
        }
        /// Memoises the top of the stack; returns its memo index.
        pub fn put(&mut self) -> u32 {
            let i = self.memo;
            self.memo += 1;
            if i < 256 {
                self.ops(&[b'q', i as u8]);
            } else {
                self.op(b'r');
                self.ops(&i.to_le_bytes());
            }
            i
        }
        pub fn get(&mut self, i: u32) -> &mut Self {
            if i < 256 {
                self.ops(&[b'h', i as u8])
            } else {
                self.op(b'j');
                self.ops(&i.to_le_bytes())
            }
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` as
        /// `torch.save` writes it, reusing memoised globals and strings as it does.
        pub fn tensor(
            &mut self,
            memo: &mut HashMap<&'static str, u32>,
            storage: &str,
            kind: &str,
            offset: i64,
            size: &[i64],
            stride: &[i64],
        ) -> &mut Self {
            let mut cached =
                |b: &mut Self, what: &'static str, make: &dyn Fn(&mut Self)| match memo.get(what) {
                    Some(&i) => {
                        b.get(i);
                    }
                    None => {
                        make(b);
                        let i = b.put();
                        memo.insert(what, i);
                    }
                };
            cached(self, "rebuild", &|b| {
                b.global("torch._utils", "_rebuild_tensor_v2");
            });
            self.ops(b"((");
            cached(self, "storage", &|b| {
                b.str("storage");
            });
            let kind_name: &'static str = Box::leak(kind.to_string().into_boxed_str());
            cached(self, kind_name, &|b| {
                b.global("torch", kind);
            });
            self.str(storage);
            self.put();
            cached(self, "cpu", &|b| {
                b.str("cpu");
            });
            let numel = size.iter().fold(1i64, |a, &b| a.wrapping_mul(b)).max(0);
            self.int(numel).op(b't');
            self.put();
            self.op(b'Q').int(offset).tuple(size);
            self.put();
            self.tuple(stride);
            self.put();
            self.op(0x89);
            cached(self, "od", &|b| {
                b.global("collections", "OrderedDict");
            });
            self.ops(b")R");
            self.put();
            self.op(b't');
            self.put();
            self.op(b'R');
            self.put();
            self
        }
        pub fn finish(&mut self) -> Vec<u8> {
            self.op(b'.');
            std::mem::take(&mut self.bytes)
        }
    }

    /// A `torch.save`-like state dict of `n` float tensors of shape [2, 3], each in its own
    /// storage `0`, `1`, ...
    pub(crate) fn state_dict(n: usize) -> Vec<u8> {
        let mut b = Builder::new();
        let mut memo = HashMap::new();
        b.global("collections", "OrderedDict");
        memo.insert("od", b.put());
        b.ops(b")R");
        b.put();
        b.op(b'(');
        for i in 0..n {
            b.str(&format!("model.layer{i}.weight"));
            b.put();
            b.tensor(
                &mut memo,
                &i.to_string(),
                "FloatStorage",
                0,
                &[2, 3],
                &[3, 1],
            );
        }
        b.op(b'u');
        b.finish()
    }

    /// The crate's SplitMix64 (the data set's): seeded, the same cases on every run.
    pub(crate) use crate::train::dataset::Rng;

    fn refused(data: &[u8]) -> String {
        match unpickle(data, "test.ckpt") {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_has(msg: &str, part: &str) {
        assert!(msg.contains(part), "{msg:?} does not say {part:?}");
    }

    fn budget(data: &[u8]) -> u64 {
        data.len() as u64 * ALLOC_PER_BYTE + ALLOC_SLACK
    }

    /// Unpickles `data`, which may be anything: an error or a value, within the budget, in
    /// bounded time. Returns the error message, if any.
    fn survive(data: &[u8], what: &str) -> Option<String> {
        let t = Instant::now();
        let r = unpickle(data, "fuzz.ckpt");
        let out = match &r {
            Ok(v) => {
                assert!(v.allocated() <= budget(data), "{what}: over budget");
                let _ = v.get("x");
                None
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("fuzz.ckpt"), "{what}: {msg}");
                Some(msg)
            }
        };
        drop(r);
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{what}: {} bytes took {took:?}",
            data.len()
        );
        out
    }

    #[test]
    fn refuses_global_calls() {
        let mut p = Builder::new();
        p.op(b'}')
            .str("x")
            .global("posix", "system")
            .str("touch /tmp/x");
        let p = p.ops(&[0x85, b'R', b's']).finish();
        let msg = refused(&p);
        assert!(
            msg.contains("refusing to load posix.system from test.ckpt"),
            "{msg}"
        );

        // STACK_GLOBAL form (protocol 4).
        let mut p = vec![0x80, 4];
        p.extend([0x8c, 8]);
        p.extend(b"builtins");
        p.extend([0x8c, 4]);
        p.extend(b"eval");
        p.extend([0x93, b'.']);
        assert_has(&refused(&p), "builtins.eval");

        // INST names the class without any GLOBAL.
        let mut p = vec![b'('];
        p.extend(b"ios\nsystem\n.");
        assert_has(&refused(&p), "os.system");

        // A torch global that is not on the list.
        let p = b"\x80\x02ctorch\nload\n.".to_vec();
        assert!(refused(p.as_slice()).contains("torch.load"));
    }

    #[test]
    fn reads_a_state_dict() {
        let p = state_dict(3);
        let v = unpickle(&p, "t.ckpt").unwrap();
        let w = v.get("model.layer2.weight").unwrap();
        let Value::Tensor(t) = &w else { panic!() };
        assert_eq!(t.storage.kind, Kind::Float);
        assert_eq!(&*t.storage.key, "2");
        assert_eq!(t.size, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        let Value::Dict(d) = v.root() else { panic!() };
        assert_eq!(d.items().len(), 3);
    }

    /// The budget is a small multiple of what real pickles need: `torch.save`-style state
    /// dicts and the fixture's own `data.pkl` stay well inside it.
    #[test]
    fn real_pickles_fit_the_budget() {
        let mut pickles = vec![("state_dict(1500)".to_string(), state_dict(1500))];
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/single/tiny-sd1.ckpt");
        if let Ok(f) = std::fs::File::open(&fixture) {
            use std::io::Read;
            let mut z = zip::ZipArchive::new(f).unwrap();
            let mut data = Vec::new();
            z.by_name("tiny-sd1/data.pkl")
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            pickles.push(("tiny-sd1.ckpt".into(), data));
        }
        for (what, p) in pickles {
            let v = unpickle(&p, "t.ckpt").unwrap();
            let per_byte = v.allocated() as f64 / p.len() as f64;
            println!(
                "{what}: {} bytes of pickle, {} charged ({per_byte:.1} per byte, {ALLOC_PER_BYTE} allowed)",
                p.len(),
                v.allocated()
            );
            assert!(per_byte * 2.0 < ALLOC_PER_BYTE as f64, "{what}: {per_byte}");
        }
    }

    #[test]
    fn nesting_is_capped() {
        let limit = format!("MAX_PICKLE_DEPTH ({MAX_PICKLE_DEPTH})");
        // [[[[...]]]] a million deep: "((((...llll.".
        let depth = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b'(').take(depth));
        p.extend(std::iter::repeat(b'l').take(depth));
        p.push(b'.');
        assert_has(&refused(&p), &limit);

        // ((((),),),) with TUPLE1: one byte a level, no stack growth. The limit itself is fine.
        let nested = |n: usize| {
            let mut p = vec![0x80, 2, b')'];
            p.extend(std::iter::repeat(0x85).take(n - 1));
            p.push(b'.');
            p
        };
        assert!(unpickle(&nested(MAX_PICKLE_DEPTH), "t").is_ok());
        assert!(refused(&nested(MAX_PICKLE_DEPTH + 1)).contains(&limit));

        // Lists appended into lists, dicts set into dicts.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b']').take(2000));
        p.extend(std::iter::repeat(b'a').take(1999));
        p.push(b'.');
        assert_has(&refused(&p), &limit);
        let mut p = vec![0x80, 2, b'}'];
        for _ in 0..1999 {
            p.extend([b'K', 1, b'}']);
        }
        p.extend(std::iter::repeat(b's').take(1999));
        p.push(b'.');
        assert_has(&refused(&p), &limit);
    }

    #[test]
    fn self_containing_containers_are_bounded_and_freed() {
        // l = []; l.append(l) again and again: each append nests one level deeper.
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..5000 {
            p.extend([b'h', 0, b'a']);
        }
        p.push(b'.');
        assert_has(&refused(&p), "MAX_PICKLE_DEPTH");

        // d = {}; d["d"] = d: accepted, and freed with the result.
        let mut b = Builder::new();
        b.op(b'}');
        b.put();
        b.str("d").get(0).op(b's');
        let p = b.finish();
        let v = unpickle(&p, "t").unwrap();
        let Value::Dict(d) = v.root() else { panic!() };
        let weak = Rc::downgrade(d);
        assert!(matches!(v.get("d"), Some(Value::Dict(_))));
        drop(v);
        assert!(weak.upgrade().is_none(), "the cycle leaked");

        // A failed unpickling frees its cycles too.
        let mut b = Builder::new();
        b.op(b']');
        b.put();
        b.get(0).op(b'a').op(0xff);
        let p = b.finish();
        assert_has(&refused(&p), "unknown pickle opcode");
    }

    #[test]
    fn stack_and_memo_are_capped() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b'N').take(MAX_PICKLE_STACK + 1));
        p.push(b'.');
        assert_has(&refused(&p), "MAX_PICKLE_STACK");
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b'(').take(MAX_PICKLE_STACK + 1));
        p.push(b'.');
        assert_has(&refused(&p), "MAX_PICKLE_STACK");
        // MEMOIZE of one value, a million times: one byte per entry, so the budget stops it
        // long before MAX_PICKLE_MEMO (which a 5-byte LONG_BINPUT per entry reaches, in
        // tests/ckpt_hostile.rs, where memory is measured).
        let mut p = vec![0x80, 4, b'N'];
        p.extend(std::iter::repeat(0x94).take(1_000_000));
        p.push(b'.');
        assert_has(&refused(&p), "memory bomb");
    }

    /// Opcodes that used to copy what they refer to: each must now cost O(1) or be charged.
    #[test]
    fn no_opcode_amplifies() {
        let long = "x".repeat(1 << 20);
        // DUP of a 1 MiB string, 500 000 times (a 500 GB copy before).
        let mut b = Builder::new();
        b.str(&long);
        b.ops(&vec![b'2'; 500_000]);
        let p = b.finish();
        assert!(survive(&p, "DUP").is_none());
        // BINGET of a memoised 1 MiB string, 300 000 times.
        let mut b = Builder::new();
        b.str(&long);
        b.put();
        for _ in 0..300_000 {
            b.get(0);
        }
        let p = b.finish();
        assert!(survive(&p, "BINGET").is_none());
        // OrderedDict(pairs) over a memoised list of 100 000 pairs, 100 000 times: quadratic
        // before, stopped by the budget now.
        let mut b = Builder::new();
        b.global("collections", "OrderedDict");
        b.put();
        b.op(b'(');
        for i in 0..100_000 {
            b.int(i).int(i).op(0x86);
        }
        b.op(b'l');
        b.put();
        b.op(0x85);
        b.put();
        for _ in 0..100_000 {
            b.ops(&[b'h', 0, b'h', 2, b'R', b'0']);
        }
        let p = b.finish();
        assert!(survive(&p, "OrderedDict").unwrap().contains("memory bomb"));
        // A memoised million-entry tuple as the size and stride of tensor after tensor: the
        // dimension count is checked before any entry is read.
        let mut b = Builder::new();
        b.op(b'(');
        for _ in 0..1_000_000 {
            b.op(b'N');
        }
        b.op(b't');
        let big = b.put();
        b.global("torch._utils", "_rebuild_tensor_v2");
        let rebuild = b.put();
        b.op(b'(').str("storage").global("torch", "FloatStorage");
        b.str("0").str("cpu").ops(&[b'K', 2, b't', b'Q']);
        let storage = b.put();
        for _ in 0..100_000 {
            b.get(rebuild).op(b'(');
            b.get(storage).ops(&[b'K', 0]).get(big).get(big).ops(b"tR0");
        }
        let p = b.finish();
        let msg = survive(&p, "int tuple").unwrap();
        assert!(msg.contains("MAX_TENSOR_DIMS"), "{msg}");
        // Lengths far beyond the data: refused before anything is allocated.
        for p in [
            vec![0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'],
            vec![
                0x80, 4, 0x8d, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            vec![0x80, 2, 0x8b, 0xff, 0xff, 0xff, 0x7f],
            vec![0x80, 2, b'B', 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(survive(&p, "length").is_some());
        }
    }

    #[test]
    fn truncations_at_every_byte_are_errors() {
        let p = state_dict(4);
        for n in 0..p.len() {
            let msg = survive(&p[..n], "truncated").expect("a truncated pickle was accepted");
            assert!(msg.contains("pickle data at byte"), "{msg}");
        }
        println!("{} truncations", p.len());
    }

    #[test]
    fn random_byte_flips() {
        let p = state_dict(6);
        let mut rng = Rng::new(0x5eed_f11b);
        let (mut ok, mut err) = (0, 0);
        let cases = 20_000;
        for case in 0..cases {
            let mut q = p.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(q.len());
                q[at] = match rng.below(3) {
                    0 => rng.next_u64() as u8,
                    1 => q[at] ^ (1 << rng.below(8)),
                    _ => [0x00, 0x7f, 0x80, 0xff][rng.below(4)],
                };
            }
            match survive(&q, &format!("flip case {case}")) {
                None => ok += 1,
                Some(_) => err += 1,
            }
        }
        println!("{cases} byte-flip cases: {ok} accepted, {err} refused");
    }

    /// Programs that stay valid: a prologue memoises a list, a dict, a long string, a list of
    /// pairs and a tensor's arguments, then stack-neutral snippets over them, each repeated up
    /// to thousands of times, run deep into the amplification cases (container copies,
    /// self-references, growing nests, rebuilt tensors with hostile shapes).
    #[test]
    fn random_valid_programs() {
        let mut rng = Rng::new(0x00c0_ffee);
        let cases = 3000;
        let (mut ok, mut err, mut by_limit) = (0, 0, 0);
        let ints = [
            0i64,
            1,
            2,
            3,
            -1,
            1 << 31,
            1 << 40,
            1 << 62,
            i64::MAX,
            i64::MIN,
        ];
        for case in 0..cases {
            let mut b = Builder::new();
            b.op(b'}');
            b.op(b']');
            b.put(); // 0: a list
            b.op(b'0').op(b'}');
            b.put(); // 1: a dict
            b.op(b'0').str(&"s".repeat(1 + rng.below(100_000)));
            b.put(); // 2: a long string
            b.op(b'0').op(b'(');
            for i in 0..rng.below(2000) {
                b.int(i as i64).int(i as i64).op(0x86);
            }
            b.op(b'l');
            b.put(); // 3: a list of pairs
            b.op(b'0').global("collections", "OrderedDict");
            b.put(); // 4
            b.op(b'0').global("torch._utils", "_rebuild_tensor_v2");
            b.put(); // 5
            b.op(b'0')
                .op(b'(')
                .str("storage")
                .global("torch", "HalfStorage");
            b.str("0").str("cpu").ops(&[b'K', 6, b't', b'Q']);
            b.put(); // 6: a storage
            b.op(b'0');
            for _ in 0..1 + rng.below(12) {
                let at = b.bytes.len();
                let k = rng.below(7) as u8;
                let j = rng.below(7) as u8;
                match rng.below(11) {
                    0 => b.ops(&[b'h', k, b'2', b'0', b'0']),
                    1 => b.ops(&[b'h', 0, b'h', j, b'a', b'0']),
                    2 => b.ops(&[b'h', 0, b'(', b'h', j, b'h', k, b'e', b'0']),
                    3 => b.ops(&[b'h', 1, b'h', 2, b'h', j, b's', b'0']),
                    4 => b.ops(&[b'h', 4, b'h', k, 0x85, b'R', b'0']),
                    5 => b.ops(&[b'(', b'h', k, b'h', j, b't', b'q', 7, b'0']),
                    6 => b.ops(&[b'h', k, 0x85, b'q', k.max(7), b'0']),
                    7 => b.ops(&[b'h', 1, b'(', b'h', k, b'h', j, b'u', b'0']),
                    8 => {
                        // A tensor with random numbers, set in the dict.
                        let dims = rng.below(10);
                        let pick = |rng: &mut Rng| ints[rng.below(ints.len())];
                        let size: Vec<i64> = (0..dims).map(|_| pick(&mut rng)).collect();
                        let stride: Vec<i64> = (0..dims).map(|_| pick(&mut rng)).collect();
                        let offset = pick(&mut rng);
                        b.str("t").ops(&[b'h', 5, b'(', b'h', 6]).int(offset);
                        b.tuple(&size).tuple(&stride).ops(b"tRs")
                    }
                    9 => b.ops(&[b'h', 1, b'0', b'2', b'0']),
                    _ => b.ops(&[b'h', k, b'0']),
                };
                let snippet = b.bytes[at..].to_vec();
                for _ in 0..[0, 1, 50, 3000][rng.below(4)] {
                    b.ops(&snippet);
                }
            }
            let p = b.finish();
            match survive(&p, &format!("valid program {case}")) {
                None => ok += 1,
                Some(msg) => {
                    err += 1;
                    if msg.contains("MAX_") || msg.contains("memory bomb") {
                        by_limit += 1;
                    }
                }
            }
        }
        println!(
            "{cases} valid-program cases: {ok} accepted, {err} refused ({by_limit} by a limit)"
        );
    }

    /// Random programs over the whole opcode set, with hostile arguments and repeated runs of
    /// opcodes (the shape of every amplification attack).
    #[test]
    fn random_hostile_programs() {
        let mut rng = Rng::new(0xb0b_5eed);
        let cases = 4000;
        let mut refused_by_limit = 0;
        let (mut ok, mut err) = (0, 0);
        let huge = [0u64, 1, 255, 256, 65535, 1 << 20, u32::MAX as u64, u64::MAX];
        for case in 0..cases {
            let mut p = vec![0x80, 2 + rng.below(4) as u8];
            let tokens = 1 + rng.below(200);
            for _ in 0..tokens {
                let start = p.len();
                match rng.below(24) {
                    0 => p.push([b'N', 0x88, 0x89, b')', b']', b'}', b'(', 0x8f][rng.below(8)]),
                    1 => p.extend([b'K', rng.next_u64() as u8]),
                    2 => {
                        p.push(b'J');
                        p.extend((rng.next_u64() as u32).to_le_bytes());
                    }
                    3 => {
                        let n = [0, 1, 8, 9, 300][rng.below(5)];
                        p.extend([0x8a, n as u8]);
                        p.extend((0..n).map(|_| rng.next_u64() as u8));
                    }
                    4 => {
                        let n = [0, 3, 1000, 70_000][rng.below(4)];
                        p.push(b'X');
                        p.extend((n as u32).to_le_bytes());
                        p.extend(std::iter::repeat(b'a').take(n));
                    }
                    5 => {
                        // A length beyond the data.
                        let n = huge[rng.below(huge.len())];
                        match rng.below(3) {
                            0 => {
                                p.push(0x8d);
                                p.extend(n.to_le_bytes());
                            }
                            1 => {
                                p.push(b'B');
                                p.extend((n as u32).to_le_bytes());
                            }
                            _ => {
                                p.push(0x8b);
                                p.extend((n as u32).to_le_bytes());
                            }
                        }
                    }
                    6 => p.push([b't', b'l', b'd', 0x91][rng.below(4)]),
                    7 => p.push([b'a', b'e', b's', b'u', 0x90][rng.below(5)]),
                    8 => p.push(0x85 + rng.below(3) as u8),
                    9 => p.extend([b'q', rng.below(8) as u8]),
                    10 => p.extend([b'h', rng.below(8) as u8]),
                    11 => {
                        p.push([b'r', b'j'][rng.below(2)]);
                        p.extend((huge[rng.below(huge.len())] as u32).to_le_bytes());
                    }
                    12 => p.push(0x94),
                    13 => p.push([b'0', b'1', b'2'][rng.below(3)]),
                    14 => {
                        let (m, n) = [
                            ("collections", "OrderedDict"),
                            ("torch._utils", "_rebuild_tensor_v2"),
                            ("torch._utils", "_rebuild_parameter"),
                            ("torch", "FloatStorage"),
                            ("torch", "HalfStorage"),
                            ("builtins", "eval"),
                        ][rng.below(6)];
                        p.extend(format!("c{m}\n{n}\n").as_bytes());
                    }
                    15 => p.push([b'R', 0x81, b'b', b'Q'][rng.below(4)]),
                    16 => p.extend(b"Xstorage"),
                    17 => {
                        p.push([b'I', b'L', b'F', b'g', b'p'][rng.below(5)]);
                        let t = ["0", "01", "-7", "99999999999999999999", "1e308", "x"];
                        p.extend(t[rng.below(t.len())].as_bytes());
                        if rng.below(8) > 0 {
                            p.push(b'\n');
                        }
                    }
                    18 => {
                        p.push(0x95);
                        p.extend(huge[rng.below(huge.len())].to_le_bytes());
                    }
                    19 => p.push(rng.next_u64() as u8),
                    _ => {
                        // Repeat the last few bytes many times.
                        let k = 1 + rng.below(12);
                        let times = [2, 100, 5000, 50_000][rng.below(4)];
                        let from = p.len().saturating_sub(k).max(2);
                        let run = p[from..].to_vec();
                        for _ in 0..times {
                            p.extend_from_slice(&run);
                        }
                    }
                }
                debug_assert!(p.len() >= start);
            }
            p.push(b'.');
            match survive(&p, &format!("program {case}")) {
                None => ok += 1,
                Some(msg) => {
                    err += 1;
                    if msg.contains("MAX_") || msg.contains("memory bomb") {
                        refused_by_limit += 1;
                    }
                }
            }
        }
        println!(
            "{cases} random programs: {ok} accepted, {err} refused ({refused_by_limit} by a limit)"
        );
    }
}
