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
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use tch::Kind;

/// A persistent storage of the archive (`data/<key>`), typed by the `torch.*Storage` tag.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub kind: Kind,
    /// Number of elements as recorded in the pickle (bytes for untyped storages).
    pub numel: i64,
}

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it: a strided view of a storage.
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

/// The plain values a checkpoint's pickle may hold.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for `i64`, as little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(StorageRef),
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
                .borrow()
                .iter()
                .rev()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v.clone()),
            _ => None,
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
/// are moved to a work list first, so that a pickle nesting containers a million deep cannot
/// overflow the stack when it is freed.
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
            work.append(&mut l.borrow_mut());
        }
        Value::Dict(d) if Rc::strong_count(d) == 1 => {
            for (k, x) in std::mem::take(&mut *d.borrow_mut()) {
                work.push(k);
                work.push(x);
            }
        }
        Value::Tuple(t) => {
            if let Some(items) = Rc::get_mut(t) {
                work.append(items);
            }
        }
        _ => {}
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

/// Stack entries: values, or the MARK that opcodes such as TUPLE and SETITEMS pop back to.
enum Slot {
    Mark,
    Value(Value),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Value>,
    /// The file, for error messages.
    source: &'a str,
}

/// Unpickles `data` (the `data.pkl` of a checkpoint called `source` in messages).
pub fn unpickle(data: &[u8], source: &str) -> Result<Value> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        source,
    };
    m.run()
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

    fn utf8(&self, bytes: &[u8]) -> Result<String> {
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err("string is not valid UTF-8"))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Slot::Value(v));
    }

    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            Some(Slot::Mark) => Err(self.err("unexpected MARK on the stack")),
            None => Err(self.err("stack underflow")),
        }
    }

    fn top(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Slot::Value(v)) => Ok(v),
            _ => Err(Error::bad_model("pickle: expected a value on the stack")),
        }
    }

    /// Pops everything down to the last MARK (and the MARK).
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self
            .stack
            .drain(at + 1..)
            .map(|s| match s {
                Slot::Value(v) => v,
                Slot::Mark => Value::None,
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&self, idx: u32) -> Result<Value> {
        self.memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {idx} is not defined")))
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = match self.stack.last() {
            Some(Slot::Value(v)) => v.clone(),
            _ => return Err(self.err("PUT with no value on the stack")),
        };
        self.memo.insert(idx, v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Result<()> {
        match allowed_global(module, name) {
            Some(g) => {
                self.push(Value::Global(g));
                Ok(())
            }
            None => Err(self.refuse(&format!("{module}.{name}"))),
        }
    }

    fn set_items(&self, target: &Value, items: Vec<Value>) -> Result<()> {
        if items.len() % 2 != 0 {
            return Err(self.err("SETITEMS with an odd number of items"));
        }
        let Value::Dict(d) = target else {
            return Err(self.err(format!("SETITEM on a {}", target.type_name())));
        };
        // Entries are kept in order, repeated keys included: readers take the last one, as a
        // Python dict would have it (and no insertion costs a scan).
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
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
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack
                        .pop()
                        .ok_or_else(|| self.err("POP on an empty stack"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let bytes = self.take(n)?;
                    self.push(long_value(bytes));
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
                    self.push(v);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'F' => {
                    let t = self.line()?;
                    let v = t
                        .parse()
                        .map_err(|_| self.err(format!("bad float {t:?}")))?;
                    self.push(Value::Float(v));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as usize,
                        0x8c => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?;
                    let s = self.utf8(bytes)?;
                    self.push(Value::Str(s));
                }
                b'T' | b'U' => {
                    // Python 2 str: bytes, read as Latin-1 text
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let bytes = self.take(n)?;
                    self.push(Value::Str(bytes.iter().map(|&b| b as char).collect()));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.len_u64()?,
                    };
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes));
                }
                b')' => self.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow"));
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => {
                            let t = other.type_name();
                            return Err(self.err(format!("APPEND to a {t}")));
                        }
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => {
                            let t = other.type_name();
                            return Err(self.err(format!("APPENDS to a {t}")));
                        }
                    }
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                    self.set_items(&dict, items)?;
                    self.push(dict);
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
                0x8f => self.push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                0x90 => {
                    // ADDITEMS (sets are kept as lists)
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => {
                            let t = other.type_name();
                            return Err(self.err(format!("ADDITEMS to a {t}")));
                        }
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)));
                }
                b'p' => {
                    let t = self.line()?;
                    let idx = t
                        .parse()
                        .map_err(|_| self.err(format!("bad memo index {t:?}")))?;
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
                    let t = self.line()?;
                    let idx = t
                        .parse()
                        .map_err(|_| self.err(format!("bad memo index {t:?}")))?;
                    let v = self.memo_get(idx)?;
                    self.push(v);
                }
                b'h' => {
                    let idx = self.u8()? as u32;
                    let v = self.memo_get(idx)?;
                    self.push(v);
                }
                b'j' => {
                    let idx = self.u32()?;
                    let v = self.memo_get(idx)?;
                    self.push(v);
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
                        (Some(m), Some(n)) => {
                            let (m, n) = (m.to_string(), n.to_string());
                            self.global(&m, &n)?;
                        }
                        _ => return Err(self.err("STACK_GLOBAL needs two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.reduce(func, args)?;
                    self.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only OrderedDict is a class we accept
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    match cls {
                        Value::Global(Global::OrderedDict) => {
                            self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))
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
                    self.push(v);
                }
                b'P' => {
                    return Err(self.err("text persistent ids (PERSID) are not PyTorch's format"))
                }
                b'i' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
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
    fn persistent_load(&self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else {
            return Err(self.err(format!("persistent id is a {}", pid.type_name())));
        };
        match t.as_slice() {
            [tag, Value::Global(Global::StorageType(kind)), key, _location, numel]
                if tag.as_str() == Some("storage") =>
            {
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => {
                        return Err(self.err(format!("storage key is a {}", other.type_name())))
                    }
                };
                Ok(Value::Storage(StorageRef {
                    key,
                    kind: *kind,
                    numel: numel.as_int().unwrap_or(-1),
                }))
            }
            _ => {
                Err(self
                    .err("persistent id is not a ('storage', type, key, location, numel) tuple"))
            }
        }
    }

    fn reduce(&self, func: Value, args: Value) -> Result<Value> {
        let Value::Tuple(args) = &args else {
            return Err(self.err(format!("REDUCE arguments are a {}", args.type_name())));
        };
        let Value::Global(g) = func else {
            return Err(self.err(format!("REDUCE of a {}", func.type_name())));
        };
        let args = Rc::clone(args);
        match g {
            Global::OrderedDict => {
                let dict = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                if let Some(first) = args.first() {
                    let pairs = match first {
                        Value::List(l) => l.borrow().clone(),
                        Value::Tuple(t) => t.as_ref().clone(),
                        other => {
                            return Err(self.err(format!("OrderedDict of a {}", other.type_name())))
                        }
                    };
                    let mut flat = Vec::new();
                    for p in pairs {
                        match &p {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                flat.push(kv[0].clone());
                                flat.push(kv[1].clone());
                            }
                            _ => return Err(self.err("OrderedDict item is not a pair")),
                        }
                    }
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
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
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

    fn int_tuple(&self, v: &Value, what: &str) -> Result<Vec<i64>> {
        let items: Vec<Value> = match v {
            Value::Tuple(t) => t.as_ref().clone(),
            Value::List(l) => l.borrow().clone(),
            other => {
                return Err(self.err(format!("tensor {what} is a {}", other.type_name())));
            }
        };
        items
            .iter()
            .map(|i| {
                i.as_int()
                    .filter(|&x| x >= 0)
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
        Value::BigInt(bytes.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unicode(s: &str) -> Vec<u8> {
        let mut v = vec![b'X'];
        v.extend((s.len() as u32).to_le_bytes());
        v.extend(s.as_bytes());
        v
    }

    fn refused(data: &[u8]) -> String {
        match unpickle(data, "test.ckpt") {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refuses_global_calls() {
        let mut p = vec![0x80, 2, b'}'];
        p.extend(unicode("x"));
        p.extend(b"cposix\nsystem\n");
        p.extend(unicode("touch /tmp/x"));
        p.extend([0x85, b'R', b's', b'.']);
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
        assert!(refused(&p).contains("builtins.eval"));

        // INST names the class without any GLOBAL.
        let mut p = vec![b'('];
        p.extend(b"ios\nsystem\n.");
        assert!(refused(&p).contains("os.system"));

        // A torch global that is not on the list.
        let p = b"\x80\x02ctorch\nload\n.".to_vec();
        assert!(refused(p.as_slice()).contains("torch.load"));
    }

    #[test]
    fn reads_a_state_dict() {
        // {"w": _rebuild_tensor_v2(("storage", HalfStorage, "0", "cpu", 6), 0, (2, 3), (3, 1),
        //  False, OrderedDict()), "n": 7}
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend(unicode("w"));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
        p.extend([b'(', b'(']);
        p.extend(unicode("storage"));
        p.extend(b"ctorch\nHalfStorage\n");
        p.extend(unicode("0"));
        p.extend(unicode("cpu"));
        p.extend([b'K', 6, b't', b'Q']);
        p.extend([
            b'K', 0, b'K', 2, b'K', 3, 0x86, b'K', 3, b'K', 1, 0x86, 0x89,
        ]);
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend([b't', b'R']);
        p.extend(unicode("n"));
        p.extend([b'K', 7, b'u', b'.']);
        let v = unpickle(&p, "t.ckpt").unwrap();
        let w = v.get("w").unwrap();
        let Value::Tensor(t) = &w else { panic!() };
        assert_eq!(t.storage.kind, Kind::Half);
        assert_eq!(t.storage.key, "0");
        assert_eq!(t.size, vec![2, 3]);
        assert_eq!(t.stride, vec![3, 1]);
        assert_eq!(v.get("n").unwrap().as_int(), Some(7));
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        // [[[[...]]]] a million deep: "((((...llll.".
        let depth = 1_000_000;
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat(b'(').take(depth));
        p.extend(std::iter::repeat(b'l').take(depth));
        p.push(b'.');
        let v = unpickle(&p, "deep.ckpt").unwrap();
        assert!(matches!(v, Value::List(_)));
        drop(v);
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        assert!(unpickle(&[0x80, 2, b'X', 9, 0, 0, 0, b'a'], "t").is_err());
        assert!(unpickle(&[0xff], "t").is_err());
        assert!(unpickle(&[], "t").is_err());
        assert!(unpickle(b"h\x05.", "t").is_err());
    }
}
