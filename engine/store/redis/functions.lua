-- The engine's server-side functions for the Redis backend.
--
-- Loaded as one Redis Functions library (FUNCTION LOAD), or as one script
-- (EVALSHA) on servers without Functions.  Every call runs one function that
-- touches the keys of ONE shard: their names share the hash tag {name:shard},
-- so on a Redis Cluster each call runs on one node.  KEYS[1] is the shard's
-- meta key; the others are derived from it (same tag, same node).
--
-- Declared keys: a call lists in KEYS every key its function may touch,
-- KEYS[1] the meta key, KEYS[2] the metrics hash, KEYS[3] the client's
-- request record (functions wrapped in once), then the rest, so that while a
-- Cluster slot migrates the server refuses the whole call (ASK, TRYAGAIN)
-- before it runs rather than failing it half-way on a key that already moved.
-- Where a key depends on data (the slot an open takes, the account a closing
-- books on, the keys a release frees, the positions on a token) the function
-- checks, before its first write, that the key was declared; if not it
-- writes nothing and answers {'NEED', hint, key...}: the client sends the
-- call again with those keys declared.  A function never deletes a key and
-- then touches it again (a migrating node would take the second touch for a
-- key that moved).
--
-- Per shard, with P = "eng:{name:shard}:":
--   P.."m"        hash  meta: magic, fingerprint, transition table, closed mask,
--                       halted, record roles (copied to every shard at create)
--   P.."free"     list  free slots of this shard
--   P.."open"     set   open slots of this shard (snapshot)
--   P.."p:"..slot hash  op (opening count), st (one-hot state, 0 when free),
--                       gen, ctr (commits: opens, transitions and releases,
--                       as C's transitions counter), rec (the record's
--                       words, little-endian, as C lays them out), cv (record
--                       version), pr (price, ts_ns, pnl_pct, pnl_usd: 32 bytes
--                       as eng_price_out), pv (price version), tok (token)
--   P.."w:"..slot stream one entry per commit while a waiter is armed (MAXLEN 1):
--                       wait_for_change blocks on it with XREAD BLOCK
--   P.."wf:"..slot string the waiting flag: set by a waiter for its whole wait
--   P.."g:"..slot string a guard's lock: owner token, with an expiry
--   P.."t:"..tok  set   open slots on a token (update_token_price)
--   P.."k:"..key  string "slot:opening" of the opening that holds the key
--   P.."pk:"..slot list the keys of the slot's opening, in bind order
--   P.."a:"..n    hash  account n's books (exact int64 units, as strings)
--   P.."afree"    list  free account numbers of this shard
--   P.."s"        hash  counters per operation and outcome (metrics)
--   P.."j"        stream the shard's journal (see "the journal" below)
--
-- Numbers (codes, table encoding, shifts) come from the C header through the
-- constants Python prepends.  Values cross as bytes where exactness matters:
-- doubles as 8 little-endian bytes (struct), ids split into slot and opening
-- (Lua numbers are doubles), money through HINCRBY (exact int64 on the server).

local function tag(keys) return string.sub(keys[1], 1, -2) end   -- P: strip the "m"

-- the call's declared keys as a set
local function declared(keys)
    local d = {}
    for i = 1, #keys do d[keys[i]] = true end
    return d
end

-- the answer that asks for keys to be declared (see the top); nothing written
local function need(hint, list)
    return {'NEED', hint, unpack(list)}
end
local function is_need(r) return type(r) == 'table' and r[1] == 'NEED' end

-- Exactly once: a writing function's first argument is its request's number
-- (a sequence number of the client), KEYS[3] the client's request record on
-- this shard: the number of its last applied request and that request's
-- reply.  A resend of that request gets the recorded reply and applies
-- nothing; an older request (a copy delayed on a dead connection) is refused.
-- A NEED answer applied nothing and is not recorded.
local function once(f)
    return function(keys, args)
        local seq = tonumber(table.remove(args, 1))
        local rec = redis.call('GET', keys[3])
        if rec then
            local at = string.find(rec, ':', 1, true)
            local last = tonumber(string.sub(rec, 1, at - 1))
            if seq == last then return cmsgpack.unpack(string.sub(rec, at + 1)) end
            if seq < last then return redis.error_reply('ERR engine: stale request ' .. seq) end
        end
        local r = f(keys, args)
        if not is_need(r) then
            redis.call('SET', keys[3], seq .. ':' .. cmsgpack.pack(r), 'PX', REQUEST_WINDOW_MS)
        end
        return r
    end
end

-- the flags of a function that only reads: it runs on a full server (maxmemory)
-- and on a read-only replica, and may not write (its metrics are counted by
-- the client, in the process's metrics)
local NO_WRITES = {'no-writes'}
-- the emergency stop runs on a full server too (it writes one small field)
local ALLOW_OOM = {'allow-oom'}

-- Incarnations.  create sets a random 64-bit number, 'inc', in every shard's
-- meta; an Engine learns it at attach (the handle carries it) and sends it as
-- the first argument of every call.  ENGINE_CHECK (REG wraps every function
-- in it) compares it with the shard's meta before the function runs: a call
-- meant for an engine that was unlinked (no meta), or lost and created again
-- under its name (another inc), changes nothing and fails with GONE or OTHER.
-- The create and remove steps (CREATE) check the name's claim themselves;
-- they get the caller's number as a third argument.
local CREATE = {claim = true, binit = true, fill = true, seal = true, renew = true,
                abort = true, drop = true, wipe = true}
ENGINE_CHECK = function(n, f, keys, args)
    local inc = table.remove(args, 1)
    if CREATE[n] then return f(keys, args, inc) end
    local have = redis.call('HGET', keys[1], 'inc')
    if have == inc then return f(keys, args) end
    if not have then
        return redis.error_reply('ENGINE_GONE no engine at ' .. keys[1] .. ': it was unlinked ' ..
                                 'or lost (a server restart without persistence?)')
    end
    return redis.error_reply('ENGINE_OTHER ' .. keys[1] .. ' is another incarnation (' .. have ..
                             ') than the caller attached to (' .. tostring(inc) .. ')')
end

local IDX = {}
for i = 0, 15 do IDX[2 ^ i] = i end

local function count(P, op, what)
    if redis.call('HGET', P .. 'm', 'metrics') ~= '0' then
        redis.call('HINCRBY', P .. 's', op .. ':' .. what, 1)
    end
end

local OUTCOME = {[APPLIED] = 'applied', [INVALID] = 'invalid', [CONFLICT] = 'conflicts',
                 [EVERSION] = 'conflicts',
                 [REJECTED] = 'rejected', [HALTED] = 'halted',
                 -- a risk limit said no: a refusal, not an error (as C counts it)
                 [ERISK_HALTED] = 'rejected', [ERISK_EXPOSURE] = 'rejected',
                 [ERISK_COUNT] = 'rejected', [ERISK_CASH] = 'rejected'}
local function outcome(P, op, rc)
    if rc ~= EBUSY then count(P, op, OUTCOME[rc] or 'errors') end
    return rc
end

-- An APPLIED reply of tx, gcommit and release carries the commit's state
-- words (what C leaves in eng_seg.last_old_word / last_new_word: the stress
-- tool logs them) in one integer: COMMITTED + (gen mod 2^16) * 1024 +
-- (from + 1) * 32 + (to + 1), from and to the state indexes before and after
-- (-1: a free slot), gen the generation after.  Every reply >= COMMITTED is
-- APPLIED; every other reply is the plain code.
local function committed(old_st, new_st, gen)
    local a = old_st == 0 and 0 or IDX[old_st] + 1
    local b = new_st == 0 and 0 or IDX[new_st] + 1
    return COMMITTED + (gen % 65536) * 1024 + a * 32 + b
end

-- the state of opening `op` of slot p (a position key), or nil and the error
local function live(p, op)
    local v = redis.call('HMGET', p, 'op', 'st')
    local cur = tonumber(v[1]) or 0
    if op > cur or op == 0 then return nil, ENOTOPEN end
    local st = tonumber(v[2]) or 0
    if op < cur or st == 0 then return nil, ESTALE end
    return st
end

-- the rule's table entry for `trigger` from one-hot `st`
local function rule(P, st, trigger)
    local T = redis.call('HGET', P .. 'm', 'table')
    return string.byte(T, IDX[st] * MAX_TRIGGERS + trigger + 1)
end

local function is_closed(P, st)
    local mask = tonumber(redis.call('HGET', P .. 'm', 'closed'))
    return math.floor(mask / 2 ^ IDX[st]) % 2 == 1
end

-- fixed point: llround(x * SCALE), half away from zero, as an exact decimal string
local function money(x)
    x = x * MONEY_SCALE
    if not (x >= 0) or x >= 2 ^ 63 then return nil end
    local f = math.floor(x)
    if x - f >= 0.5 then f = f + 1 end
    return string.format('%.0f', f)
end

-- compare two decimal int64 strings exactly: -1, 0, 1
local function cmp(a, b)
    local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
    if na ~= nb then return na and -1 or 1 end
    local x, y = na and string.sub(a, 2) or a, nb and string.sub(b, 2) or b
    local r
    if #x ~= #y then r = #x < #y and -1 or 1
    elseif x == y then r = 0
    else r = x < y and -1 or 1 end
    return na and -r or r
end

local function neg(a)
    if a == '0' then return a end
    if string.sub(a, 1, 1) == '-' then return string.sub(a, 2) end
    return '-' .. a
end

local function word_f8(rec, w) return (struct.unpack('<d', rec, w * 8 + 1)) end
local function word_i8(rec, w) return (struct.unpack('<l', rec, w * 8 + 1)) end

local function roles(P)
    local v = redis.call('HMGET', P .. 'm', 'r_entry', 'r_amount', 'r_side', 'r_account')
    return tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), tonumber(v[4])
end

-- the 32-byte price record for `price` (8 bytes ts) against record rec
local function price_rec(P, rec, price, ts)
    local e, a, sd = roles(P)
    local pct, usd = 0.0, 0.0
    if e and e >= 0 then
        local entry, amount, side = word_f8(rec, e), word_f8(rec, a), word_i8(rec, sd)
        local diff = price - entry
        pct = diff / entry * 100.0 * side
        usd = diff * amount * side
    end
    return struct.pack('<d', price) .. ts .. struct.pack('<dd', pct, usd)
end

local function write_price(P, p, rec, price, ts)
    redis.call('HSET', p, 'pr', price_rec(P, rec, price, ts))
    return redis.call('HINCRBY', p, 'pv', 1)
end

local journal   -- (defined below, with the other journal helpers)
-- the journal entry of a price write on position p (state st)
local function journal_price(P, slot, p, st)
    local v = redis.call('HMGET', p, 'op', 'pr', 'pv')
    journal(P, 'price', 's', slot, 'o', v[1], 'st', st, 'r', v[2], 'v', v[3])
end

-- merge update words (mask bit i: word i of upd) into rec
local function merge(rec, mask, upd)
    local i = 0
    while mask > 0 do
        if mask % 2 == 1 then
            rec = string.sub(rec, 1, i * 8) .. string.sub(upd, i * 8 + 1, i * 8 + 8) ..
                  string.sub(rec, i * 8 + 9)
        end
        mask = math.floor(mask / 2)
        i = i + 1
    end
    return rec
end

-- the account hash of account id (number n, opening aop) in shard P, or nil, error
local function account_of(P, n, aop)
    local a = P .. 'a:' .. n
    local cur = tonumber(redis.call('HGET', a, 'op')) or 0
    if aop > cur or aop == 0 then return nil, EBADACCOUNT end
    if aop < cur or redis.call('HGET', a, 'open') ~= '1' then return nil, ESTALEACCOUNT end
    return a
end

-- the books of an account as strings, for the client and for checks
local BOOKS = {'cash', 'reserved', 'realized', 'opening_cash', 'deposits', 'withdrawals',
               'max_exposure', 'max_loss', 'max_positions', 'open_positions', 'halted', 'version',
               'op', 'worst_gain', 'worst_loss'}
local function books(a)
    return redis.call('HMGET', a, unpack(BOOKS))
end

-- add decimal string d to field f of hash h; false if it would pass int64
local function add(h, f, d)
    return (pcall(redis.call, 'HINCRBY', h, f, d))
end

-- x - y of two decimal int64 strings whose difference fits, exactly (HINCRBY)
local function diff(h, x, y)
    redis.call('HSET', h, 'scratch', x)
    redis.call('HINCRBY', h, 'scratch', neg(y))
    local d = redis.call('HGET', h, 'scratch')
    redis.call('HDEL', h, 'scratch')
    return d
end

-- does x + d (decimal strings) fit int64?
local function fits(h, x, d)
    redis.call('HSET', h, 'scratch', x)
    local ok = add(h, 'scratch', d)
    redis.call('HDEL', h, 'scratch')
    return ok
end

-- a booked position's worst case, as C's position_worst (see "accounts" in
-- accounts.c): notional, top = money(BOOK_PRICE_MULT x entry x amount), the most
-- its close adds to cash (gain) and takes from it (loss); nil if top is
-- beyond money
local function worst(a, entry, amount, side)
    local notional = money(entry * amount)
    local top = money(entry * BOOK_PRICE_MULT * amount)
    if not notional or not top then return nil end
    local over = diff(a, top, notional)
    if side > 0 then return notional, top, over, notional end
    return notional, top, notional, over
end

-- cash and realized keep room for every open position's worst close
local function room_ok(a)
    local v = redis.call('HMGET', a, 'cash', 'realized', 'worst_gain', 'worst_loss')
    local g, l = v[3] or '0', v[4] or '0'
    return fits(a, v[1], g) and fits(a, v[2], g) and fits(a, v[1], neg(l)) and fits(a, v[2], neg(l))
end

-- reserve notional (decimal string) on account a, with the position's worst
-- gain and loss: 0, or a risk code (EBADMONEY: no room to book its close)
local function reserve(a, notional, gain, loss)
    local b = books(a)
    if b[11] == '1' then return ERISK_HALTED end
    if tonumber(b[10]) >= tonumber(b[9]) then return ERISK_COUNT end
    if not add(a, 'reserved', notional) then return ERISK_EXPOSURE end
    local reserved = redis.call('HGET', a, 'reserved')
    local rc = 0
    if cmp(reserved, b[7]) > 0 then rc = ERISK_EXPOSURE
    elseif cmp(reserved, b[1]) > 0 then rc = ERISK_CASH end   -- notional > cash - reserved
    if rc == 0 then
        if not add(a, 'worst_gain', gain) then rc = EBADMONEY
        elseif not add(a, 'worst_loss', loss) then
            redis.call('HINCRBY', a, 'worst_gain', neg(gain))
            rc = EBADMONEY
        elseif not room_ok(a) then
            redis.call('HINCRBY', a, 'worst_gain', neg(gain))
            redis.call('HINCRBY', a, 'worst_loss', neg(loss))
            rc = EBADMONEY
        end
    end
    if rc ~= 0 then
        redis.call('HINCRBY', a, 'reserved', neg(notional))
        return rc
    end
    redis.call('HINCRBY', a, 'open_positions', 1)
    redis.call('HINCRBY', a, 'version', 1)
    return 0
end

-- a closing booked on its account: release the reservation, book realized
-- = side x (money(price x amount) - notional) into cash, price the fill
-- (the closing transition's exit_price, when it gives one > 0) or else the
-- last price; losses reaching max_loss halt the account
local function book_close(P, p, rec, fill)
    local an, aop = unpack(redis.call('HMGET', p, 'an', 'aop'))
    if not aop or aop == '0' then return 0 end
    local e, am, sd = roles(P)
    local a = P .. 'a:' .. an
    local amount, side = word_f8(rec, am), word_i8(rec, sd)
    local notional, top, gain, loss = worst(a, word_f8(rec, e), amount, side)
    local at = fill or struct.unpack('<d', redis.call('HGET', p, 'pr'), 1)
    local last = money(at * amount)
    -- a price above the band (or past money): refused, nothing changes
    if not notional or not last or cmp(last, top) > 0 then return EBADMONEY end
    local up, down = last, notional
    if side < 0 then up, down = notional, last end
    -- realized = up - down, exact (both in [0, 2^63): it fits), in [-loss, gain]
    local realized = diff(a, up, down)
    -- all or nothing, as C: cash and realized both fit int64, or neither moves
    -- (never refused within the band: the opening kept the room)
    if not add(a, 'cash', realized) then return EBADMONEY end
    if not add(a, 'realized', realized) then
        redis.call('HINCRBY', a, 'cash', neg(realized))
        return EBADMONEY
    end
    redis.call('HINCRBY', a, 'reserved', neg(notional))
    redis.call('HINCRBY', a, 'open_positions', -1)
    for f, d in pairs({worst_gain = gain, worst_loss = loss}) do   -- never below 0, as C
        if redis.call('HINCRBY', a, f, neg(d)) < 0 then redis.call('HSET', a, f, '0') end
    end
    local realized = redis.call('HGET', a, 'realized')
    if string.sub(realized, 1, 1) == '-' and cmp(neg(realized), redis.call('HGET', a, 'max_loss')) >= 0 then
        redis.call('HSET', a, 'halted', '1')
    end
    redis.call('HINCRBY', a, 'version', 1)
    return 0
end

-- a commit on slot: one stream entry, only while a waiter's flag is armed
-- (wprep arms it, in the same step as it reads the stream's last id, so a
-- commit after a wait began always reaches the stream)
local function wake(P, slot, new)
    if redis.call('EXISTS', P .. 'wf:' .. slot) == 1 then
        redis.call('XADD', P .. 'w:' .. slot, 'MAXLEN', '1', '*', 's', new)
    end
end

-- The journal.  Every committed change appends one entry to the shard's
-- stream P.."j", in the same function call as the change (so the record
-- exists iff the change committed: a function's writes apply whole, a
-- refused call returns before its first write, and a resend of a call
-- that applied gets its recorded reply from `once` without running again).
-- The meta's 'jrec' is the records retained (0 or absent: no journal;
-- XADD trims the oldest past it), 'jprices' = '1' journals price writes,
-- 'jseq' the shard's last seq.  An entry's id is '<seq>-1': seq is 1, 2,
-- ... per shard, in the shard's commit order (so per position and per
-- account, whose keys live on one shard).  Fields: k kind, ts (server clock
-- in ns), then by kind: s slot, o opening, st state after, t trigger, r
-- the record after (the record's bytes; an account's books, msgpacked;
-- a key's bytes; a price's 32 bytes; the halt flag).
journal = function(P, kind, ...)
    local m = redis.call('HMGET', P .. 'm', 'jrec', 'jprices')
    local keep = tonumber(m[1]) or 0
    if keep == 0 or (kind == 'price' and m[2] ~= '1') then return end
    local seq = redis.call('HINCRBY', P .. 'm', 'jseq', 1)
    local t = redis.call('TIME')
    local ts = t[1] .. string.format('%06d', tonumber(t[2])) .. '000'   -- exact (no doubles)
    redis.call('XADD', P .. 'j', 'MAXLEN', keep, seq .. '-1', 'k', kind, 'ts', ts, ...)
end

-- the journal entry of position p's change (slot, its fields after it)
local function journal_pos(P, kind, slot, p, trigger)
    local v = redis.call('HMGET', p, 'op', 'st', 'rec', 'cv')
    journal(P, kind, 's', slot, 'o', v[1], 'st', v[2], 't', trigger or '', 'r', v[3] or '',
            'v', v[4] or '0')
end

-- the journal entry of account a's change (number n): its books after it,
-- and its key (the Account an event carries is the account's, key and all)
local function journal_account(P, n, a)
    local b = books(a)
    for i = 1, #BOOKS do b[i] = b[i] or '0' end
    local key = redis.call('HGET', a, 'key')
    if key then
        journal(P, 'account', 's', n, 'o', b[13], 'r', table.concat(b, ','), 'key', key)
    else
        journal(P, 'account', 's', n, 'o', b[13], 'r', table.concat(b, ','))
    end
end

-- the account key a closing of position p books on, or nil
local function account_key(P, p)
    local an, aop = unpack(redis.call('HMGET', p, 'an', 'aop'))
    if not aop or aop == '0' then return nil end
    return P .. 'a:' .. an
end

-- commit target index `target` on position p (state st): fields, booking, wake;
-- returns APPLIED and its committed() reply, or an error code, or a NEED
-- answer when the account it books on is not among `keys` (nil: the caller
-- checked every account key already)
local function commit(P, slot, p, st, target, mask, upd, keys, trigger)
    local new = 2 ^ target
    local rec = redis.call('HGET', p, 'rec')
    if mask > 0 then rec = merge(rec, mask, upd) end
    -- the booking first: a refusal must leave nothing written (Redis does not roll back)
    local booked
    if not is_closed(P, st) and is_closed(P, new) then
        local a = keys and account_key(P, p)
        if a and not declared(keys)[a] then return need('', {a}) end
        local xp, fill = tonumber(redis.call('HGET', P .. 'm', 'r_xprice')), nil
        if xp and xp >= 0 and math.floor(mask / 2 ^ xp) % 2 == 1 and word_f8(upd, xp) > 0 then
            fill = word_f8(upd, xp)
        end
        local rc = book_close(P, p, rec, fill)
        if rc ~= 0 then return rc end
        booked = account_key(P, p)
    end
    if mask > 0 then
        redis.call('HSET', p, 'rec', rec)
        redis.call('HINCRBY', p, 'cv', 1)
    end
    redis.call('HSET', p, 'st', new)
    local gen = redis.call('HINCRBY', p, 'gen', 1)
    redis.call('HINCRBY', p, 'ctr', 1)
    wake(P, slot, new)
    journal_pos(P, 'transition', slot, p, trigger)
    if booked then journal_account(P, redis.call('HGET', p, 'an'), booked) end
    return APPLIED, committed(st, new, gen)
end

-- one transition of (slot, op) by trigger; guarded rules answer EGUARDED;
-- an APPLIED one returns committed() as a second value
local function transition(P, slot, op, trigger, mask, upd, guard_token, keys)
    local p = P .. 'p:' .. slot
    local st, err = live(p, op)
    if not st then return err end
    if redis.call('HGET', P .. 'm', 'halted') == '1' then return HALTED end
    local g = redis.call('GET', P .. 'g:' .. slot)
    if g and g ~= guard_token then return EBUSY end
    local e = rule(P, st, trigger)
    local target = e % (RULE_TARGET_MASK + 1)
    if target == 0 then return INVALID end
    if e >= RULE_GUARDED and not guard_token then return EGUARDED end
    return commit(P, slot, p, st, target - 1, mask, upd, keys, trigger)
end

-- Exits fired by the price, as C's (see "exits" in native/prices.c): the
-- meta's x_armed (the armed one-hot state; absent: the spec has no exits),
-- x_trigger, and the words of the levels and of what a fire writes (r_stop,
-- r_tp, r_trail, r_reason, r_xprice; -1: the spec has no such field).  In
-- side space (x = price x side) a position fires STOP_LOSS at x <= stop x
-- side, TRAILING_STOP at x <= peak - trail, TAKE_PROFIT at x >= tp x side
-- (a level of 0 is off); peak ('pk', 8 bytes) is the highest x written while
-- armed, entry x side at first.  The same doubles as C, so the same decision.
local function exits(P)
    local v = redis.call('HMGET', P .. 'm', 'x_armed', 'x_trigger', 'r_stop', 'r_tp', 'r_trail',
                         'r_reason', 'r_xprice', 'r_side')
    if not v[1] then return nil end
    local X = {}
    for i, k in ipairs({'armed', 'trigger', 'stop', 'tp', 'trail', 'reason', 'xprice', 'side'}) do
        X[k] = tonumber(v[i])
    end
    return X
end

local function level(rec, w)
    if not w or w < 0 then return 0.0 end
    return word_f8(rec, w)
end

-- the reason the price fires for record rec and peak (0: none), and the new peak
local function crossing(X, rec, price, peak)
    local side = word_i8(rec, X.side)
    local x = price * side
    local stop, tp, trail = level(rec, X.stop), level(rec, X.tp), level(rec, X.trail)
    local reason = 0
    if stop > 0 and x <= stop * side then reason = EXIT_STOP_LOSS
    elseif trail > 0 and x <= peak - trail then reason = EXIT_TRAILING_STOP
    elseif tp > 0 and x >= tp * side then reason = EXIT_TAKE_PROFIT end
    if x > peak then peak = x end
    return reason, peak
end

-- one word's update: mask bit and 8 bytes, placed at word w of upd
local function word_update(mask, upd, w, bytes)
    return mask + 2 ^ w, string.sub(upd, 1, w * 8) .. bytes .. string.sub(upd, w * 8 + 9)
end

-- a price write to the position p (state st, record rec): the exit first (the
-- armed trigger's commit with exit_reason and exit_price), then the price;
-- 0, or EBUSY with nothing written when it would fire while a guarded
-- transition holds the slot's lock (as C, whose fire waits for that lock)
local function price_write(P, X, slot, p, st, rec, price, ts)
    if X and st == X.armed then
        local pk, peak = redis.call('HGET', p, 'pk'), nil
        if pk then peak = struct.unpack('<d', pk)
        else peak = word_f8(rec, (roles(P))) * word_i8(rec, X.side) end
        local reason, top = crossing(X, rec, price, peak)
        if reason ~= 0 and redis.call('HGET', P .. 'm', 'halted') ~= '1' and
                redis.call('EXISTS', P .. 'g:' .. slot) == 1 then
            return EBUSY
        end
        if reason ~= 0 then
            local e = rule(P, st, X.trigger)
            local target = e % (RULE_TARGET_MASK + 1)
            local mask, upd = 0, string.rep('\0', #rec)
            if X.reason >= 0 then
                mask, upd = word_update(mask, upd, X.reason, struct.pack('<l', reason))
            end
            mask, upd = word_update(mask, upd, X.xprice, struct.pack('<d', price))
            local rc = HALTED
            if redis.call('HGET', P .. 'm', 'halted') ~= '1' and target > 0 then
                rc = commit(P, slot, p, st, target - 1, mask, upd, nil, X.trigger)
            end
            count(P, 'exit', OUTCOME[rc] or 'errors')
            if rc == APPLIED then rec = redis.call('HGET', p, 'rec') end
        end
        if top ~= peak then redis.call('HSET', p, 'pk', struct.pack('<d', top)) end
    end
    write_price(P, p, rec, price, ts)
    return 0
end

REG('tx', once(function(keys, args)
    local P = tag(keys)
    local op = 'transition'
    local mask = tonumber(args[4])
    if mask > 0 then op = 'transition_ctx' end
    local rc, applied = transition(P, args[1], tonumber(args[2]), tonumber(args[3]), mask,
                                   args[5], nil, keys)
    if is_need(rc) then return rc end
    outcome(P, op, rc)
    return applied or rc
end))

-- take a guard's lock: returns {code, state index, rec, cv, pr, pv}
REG('glock', once(function(keys, args)
    local P = tag(keys)
    local slot, op, trigger, token, ttl = args[1], tonumber(args[2]), tonumber(args[3]), args[4], args[5]
    local p = P .. 'p:' .. slot
    local st, err = live(p, op)
    if not st then return {err} end
    if redis.call('HGET', P .. 'm', 'halted') == '1' then return {HALTED} end
    local e = rule(P, st, trigger)
    if e % (RULE_TARGET_MASK + 1) == 0 then return {INVALID} end
    if redis.call('SET', P .. 'g:' .. slot, token, 'NX', 'PX', ttl) == false then return {EBUSY} end
    local v = redis.call('HMGET', p, 'rec', 'cv', 'pr', 'pv')
    return {APPLIED, IDX[st], v[1], v[2], v[3], v[4]}
end))

-- commit (allow=1) or reject under the guard's lock, only while it is ours
REG('gcommit', once(function(keys, args)
    local P = tag(keys)
    local slot, op, trigger, token, allow = args[1], tonumber(args[2]), tonumber(args[3]), args[4], args[5]
    local gk = P .. 'g:' .. slot
    if redis.call('GET', gk) ~= token then
        return outcome(P, 'transition_ctx', CONFLICT)   -- expired: another may have moved it
    end
    local rc, applied = REJECTED, nil
    if allow == '1' then
        rc, applied = transition(P, slot, op, trigger, tonumber(args[6]), args[7], token, keys)
        if is_need(rc) then return rc end
    end
    redis.call('DEL', gk)
    outcome(P, 'transition_ctx', rc)
    return applied or rc
end))

REG('gunlock', function(keys, args)
    local P = tag(keys)
    local gk = P .. 'g:' .. args[1]
    if redis.call('GET', gk) == args[2] then redis.call('DEL', gk) end
    return 0
end)

REG('state', function(keys, args)
    local st, err = live(tag(keys) .. 'p:' .. args[1], tonumber(args[2]))
    return st or err
end, NO_WRITES)

-- the raw parts of the state: {st, gen, ctr, locked, op}
REG('word', function(keys, args)
    local P = tag(keys)
    local v = redis.call('HMGET', P .. 'p:' .. args[1], 'st', 'gen', 'op')
    local locked = redis.call('EXISTS', P .. 'g:' .. args[1])
    return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, locked, tonumber(v[3]) or 0}
end, NO_WRITES)

REG('price', function(keys, args)
    local P = tag(keys)
    local p = P .. 'p:' .. args[1]
    local st, err = live(p, tonumber(args[2]))
    if not st then return {err} end
    local v = redis.call('HMGET', p, 'pr', 'pv')
    return {0, v[1], v[2]}
end, NO_WRITES)

REG('context', function(keys, args)
    local P = tag(keys)
    local p = P .. 'p:' .. args[1]
    local st, err = live(p, tonumber(args[2]))
    if not st then return {err} end
    local v = redis.call('HMGET', p, 'rec', 'cv')
    return {0, v[1], v[2]}
end, NO_WRITES)

REG('upd', once(function(keys, args)
    local P = tag(keys)
    local p = P .. 'p:' .. args[1]
    local st, err = live(p, tonumber(args[2]))
    if not st then return outcome(P, 'price', err) end
    local rc = price_write(P, exits(P), args[1], p, st, redis.call('HGET', p, 'rec'),
                           struct.unpack('<d', args[3]), args[4])
    if rc == 0 then
        journal_price(P, args[1], p, tonumber(redis.call('HGET', p, 'st')))
    end
    return outcome(P, 'price', rc)
end))

-- batch: slots and openings as '<I4' arrays, prices '<d'; live ones written
-- batch: slots and openings as '<I4' arrays, prices '<d'; an id whose
-- opening is not open is skipped (the client checked the arrays).  {0, written}
REG('upds', once(function(keys, args)
    local P = tag(keys)
    local slots, ops, prices, ts = args[1], args[2], args[3], args[4]
    local n, written = #slots / 4, 0
    local X = exits(P)
    for i = 0, n - 1 do
        local slot = struct.unpack('<I4', slots, i * 4 + 1)
        local p = P .. 'p:' .. slot
        local st = live(p, (struct.unpack('<I4', ops, i * 4 + 1)))
        if st then
            if price_write(P, X, slot, p, st, redis.call('HGET', p, 'rec'),
                           (struct.unpack('<d', prices, i * 8 + 1)), ts) ~= 0 then
                return {EBUSY, written, i}   -- as C: the pass stops there, with its index
            end
            journal_price(P, slot, p, tonumber(redis.call('HGET', p, 'st')))
            written = written + 1
        end
    end
    count(P, 'price_batch', 'applied')
    return {0, written}
end))

-- the positions on the token are declared keys: NEED them all if one is not
REG('tokp', once(function(keys, args)
    local P = tag(keys)
    local price = struct.unpack('<d', args[2])
    local n = 0
    local slots, list = redis.call('SMEMBERS', P .. 't:' .. args[1]), {}
    local d = declared(keys)
    local X = exits(P)
    -- a fire (X) also reads the guard's lock and wakes waiters (commit)
    local parts = X and {'p:', 'g:', 'wf:', 'w:'} or {'p:'}
    for _, slot in ipairs(slots) do
        for _, x in ipairs(parts) do list[#list + 1] = P .. x .. slot end
    end
    for _, k in ipairs(list) do
        if not d[k] then return need('', list) end
    end
    local busy = false
    for _, slot in ipairs(slots) do
        local p = P .. 'p:' .. slot
        local v = redis.call('HMGET', p, 'st', 'rec')
        if not is_closed(P, tonumber(v[1])) then
            if price_write(P, X, slot, p, tonumber(v[1]), v[2], price, args[3]) == 0 then
                journal_price(P, slot, p, tonumber(redis.call('HGET', p, 'st')))
                n = n + 1
            else
                busy = true   -- as C: write the others, then say EBUSY
            end
        end
    end
    count(P, 'price_batch', 'applied')
    if busy then return EBUSY end
    return n
end))

-- vector reads and transitions: refused as a whole at the first bad element
-- (returned as {code, index}); else one value per element
REG('states', function(keys, args)
    local P = tag(keys)
    local slots, ops = args[1], args[2]
    local out = {}
    for i = 0, #slots / 4 - 1 do
        local st, err = live(P .. 'p:' .. struct.unpack('<I4', slots, i * 4 + 1),
                             (struct.unpack('<I4', ops, i * 4 + 1)))
        if not st then return {err, i} end
        out[#out + 1] = st
    end
    return {0, struct.pack('<' .. string.rep('H', #out), unpack(out))}
end, NO_WRITES)

REG('prices', function(keys, args)
    local P = tag(keys)
    local slots, ops = args[1], args[2]
    local out = {}
    for i = 0, #slots / 4 - 1 do
        local p = P .. 'p:' .. struct.unpack('<I4', slots, i * 4 + 1)
        local st, err = live(p, (struct.unpack('<I4', ops, i * 4 + 1)))
        if not st then return {err, i} end
        local v = redis.call('HMGET', p, 'pr', 'pv')
        out[#out + 1] = v[1] .. struct.pack('<L', tonumber(v[2]) or 0)
    end
    return {0, table.concat(out)}
end, NO_WRITES)

-- (every account a position of the batch is booked on is a declared key)
REG('txmany', once(function(keys, args)
    local P = tag(keys)
    local slots, ops, trig = args[1], args[2], args[3]
    local n = #slots / 4
    local accounts, d = {}, nil
    for i = 0, n - 1 do   -- every element checked before any is applied
        local slot = struct.unpack('<I4', slots, i * 4 + 1)
        local st, err = live(P .. 'p:' .. slot, (struct.unpack('<I4', ops, i * 4 + 1)))
        if not st then return {err, i} end
        local e = rule(P, st, (struct.unpack('<I4', trig, i * 4 + 1)))
        if e >= RULE_GUARDED then return {EGUARDED, i} end
        local a = account_key(P, P .. 'p:' .. slot)
        if a then
            d = d or declared(keys)
            if not d[a] then accounts[#accounts + 1] = a end
        end
    end
    if #accounts > 0 then return need('', accounts) end
    local out = {}
    for i = 0, n - 1 do
        local rc = transition(P, struct.unpack('<I4', slots, i * 4 + 1),
                              (struct.unpack('<I4', ops, i * 4 + 1)),
                              (struct.unpack('<I4', trig, i * 4 + 1)), 0, '', nil)
        if rc == ESTALE or rc == ENOTOPEN then rc = INVALID
        elseif rc == EGUARDED or rc == EBUSY then rc = CONFLICT end   -- a guard's lock: as tx
        outcome(P, 'transition', rc)
        if rc < 0 then rc = MANY_ERROR - rc end   -- as C: the element's own error
        out[#out + 1] = rc
    end
    return {0, struct.pack('<' .. string.rep('B', n), unpack(out))}
end))

-- The entry a call may take from free list L: `hint` (whose keys the client
-- declared) if it is among the first FREE_SCAN entries; false when L is
-- empty; else nil and a candidate, the entry `pick` (mod FREE_SCAN) of L,
-- for the client to declare and send again.
local function pick_free(L, hint, pick)
    local n = redis.call('LLEN', L)
    if n == 0 then return false end
    if hint ~= '' and redis.call('LPOS', L, hint, 'MAXLEN', FREE_SCAN) then return hint end
    return nil, redis.call('LINDEX', L, pick % math.min(n, FREE_SCAN))
end

-- the entry of L (after a take) the client declares for its next take
local function next_free(L, pick)
    local n = redis.call('LLEN', L)
    if n == 0 then return '' end
    return redis.call('LINDEX', L, pick % math.min(n, FREE_SCAN))
end

-- A key's record k:key exists exactly while an opening holds the key: an
-- open or bind sets it, the release of its opening deletes it.

-- open: args rec words; token (decimal); ts (8 bytes); key (or ''); account
-- number and opening ('0' '0' for none); the free slot the client declared
-- ('' for none) and its pick (see pick_free)
-- returns {0, slot, op, gen, next} (gen: the slot's generation after the
-- opening, next: the free slot to declare next time) or {code}
REG('open', once(function(keys, args)
    local P = tag(keys)
    local rec, tok, ts, key, an, aop = args[1], args[2], args[3], args[4], args[5], tonumber(args[6])
    local pick = tonumber(args[8])
    local slot, cand = pick_free(P .. 'free', args[7], pick)
    if slot == nil then return need(cand, {P .. 'p:' .. cand, P .. 'pk:' .. cand}) end
    local kk
    if key ~= '' then
        kk = P .. 'k:' .. key
        if redis.call('EXISTS', kk) == 1 then return {outcome(P, 'open', EKEYEXISTS)} end
        if tonumber(redis.call('HGET', P .. 'm', 'kpp')) == 0 then
            return {outcome(P, 'open', EKEYLIMIT)}
        end
    end
    local a
    local e, am = roles(P)
    if aop ~= 0 then
        local err
        a, err = account_of(P, an, aop)
        if not a then return {outcome(P, 'open', err)} end
        local _, _, sd = roles(P)
        local notional, _, gain, loss = worst(a, word_f8(rec, e), word_f8(rec, am),
                                              word_i8(rec, sd))
        if not notional then return {outcome(P, 'open', EBADMONEY)} end
        local rc = reserve(a, notional, gain, loss)
        if rc ~= 0 then
            local b = books(a)
            return {outcome(P, 'open', rc), notional, unpack(b)}
        end
    end
    if not slot then
        if a then   -- undo the reservation
            local _, _, sd = roles(P)
            local notional, _, gain, loss = worst(a, word_f8(rec, e), word_f8(rec, am),
                                                  word_i8(rec, sd))
            redis.call('HINCRBY', a, 'worst_gain', neg(gain))
            redis.call('HINCRBY', a, 'worst_loss', neg(loss))
            redis.call('HINCRBY', a, 'reserved', neg(notional))
            redis.call('HINCRBY', a, 'open_positions', -1)
            redis.call('HINCRBY', a, 'version', -1)
        end
        return {outcome(P, 'open', EFULL)}
    end
    redis.call('LREM', P .. 'free', 1, slot)
    local p = P .. 'p:' .. slot
    local op = redis.call('HINCRBY', p, 'op', 1)
    local initial = redis.call('HGET', P .. 'm', 'initial')
    local opened = tonumber(redis.call('HGET', P .. 'm', 'r_opened'))
    if opened and opened >= 0 then
        rec = string.sub(rec, 1, opened * 8) .. ts .. string.sub(rec, opened * 8 + 9)
    end
    local first = 0.0
    if e and e >= 0 then first = word_f8(rec, e) end
    redis.call('HSET', p, 'st', initial, 'rec', rec, 'tok', tok, 'an', an, 'aop', aop or 0,
               'pr', price_rec(P, rec, first, ts))
    local X = exits(P)
    if X then   -- the peak of exits (see price_write): entry x side at first
        redis.call('HSET', p, 'pk', struct.pack('<d', first * word_i8(rec, X.side)))
    end
    redis.call('HINCRBY', p, 'cv', 1)
    redis.call('HINCRBY', p, 'pv', 1)
    local gen = redis.call('HINCRBY', p, 'gen', 1)
    redis.call('HINCRBY', p, 'ctr', 1)
    redis.call('SADD', P .. 'open', slot)
    redis.call('SADD', P .. 't:' .. tok, slot)
    local pk = P .. 'pk:' .. slot   -- a release deleted it; never delete and touch again
    if kk then
        redis.call('SET', kk, slot .. ':' .. op)
        redis.call('RPUSH', pk, key)
        redis.call('LTRIM', pk, -1, -1)
    else
        redis.call('DEL', pk)
    end
    journal_pos(P, 'open', slot, p)
    if kk then journal(P, 'key', 's', slot, 'o', op, 'st', initial, 'r', key) end
    if a then journal_account(P, an, a) end
    count(P, 'open', 'applied')
    return {0, tonumber(slot), op, gen, next_free(P .. 'free', pick)}
end))

REG('bind', once(function(keys, args)
    local P = tag(keys)
    local slot, op, key = args[1], tonumber(args[2]), args[3]
    local p = P .. 'p:' .. slot
    local st, err = live(p, op)
    if not st then return outcome(P, 'key', err) end
    local kk = P .. 'k:' .. key
    if redis.call('EXISTS', kk) == 1 then return outcome(P, 'key', EKEYEXISTS) end
    local pk = P .. 'pk:' .. slot
    if redis.call('LLEN', pk) >= tonumber(redis.call('HGET', P .. 'm', 'kpp')) then
        return outcome(P, 'key', EKEYLIMIT)
    end
    redis.call('SET', kk, slot .. ':' .. op)
    redis.call('RPUSH', pk, key)
    journal(P, 'key', 's', slot, 'o', op, 'st', st, 'r', key)
    return outcome(P, 'key', 0)
end))

-- {slot, op} of the open opening holding key, or {0}
REG('lookup', function(keys, args)
    local P = tag(keys)
    local holder = redis.call('GET', P .. 'k:' .. args[1])
    if not holder then return {0} end
    local s, o = string.match(holder, '(%d+):(%d+)')
    return {tonumber(s), tonumber(o)}
end, NO_WRITES)

REG('keys', function(keys, args)
    local P = tag(keys)
    local st, err = live(P .. 'p:' .. args[1], tonumber(args[2]))
    if not st then return {err} end
    return {0, redis.call('LRANGE', P .. 'pk:' .. args[1], 0, -1)}
end, NO_WRITES)

-- (the token's set and the records of the keys bound are declared keys)
REG('release', once(function(keys, args)
    local P = tag(keys)
    local slot, op = args[1], tonumber(args[2])
    local p = P .. 'p:' .. slot
    local st, err = live(p, op)
    if not st then return err end
    if not is_closed(P, st) or redis.call('EXISTS', P .. 'g:' .. slot) == 1 then return INVALID end
    local tok = redis.call('HGET', p, 'tok')
    local bound = redis.call('LRANGE', P .. 'pk:' .. slot, 0, -1)
    local list = {P .. 't:' .. tok}
    for _, key in ipairs(bound) do list[#list + 1] = P .. 'k:' .. key end
    local d = declared(keys)
    for _, k in ipairs(list) do
        if not d[k] then return need('', list) end
    end
    for _, key in ipairs(bound) do
        local kk = P .. 'k:' .. key
        if redis.call('GET', kk) == slot .. ':' .. op then redis.call('DEL', kk) end
    end
    redis.call('DEL', P .. 'pk:' .. slot)
    redis.call('HSET', p, 'st', 0)
    local gen = redis.call('HINCRBY', p, 'gen', 1)
    redis.call('HINCRBY', p, 'ctr', 1)   -- a release is a commit (C counts it too)
    redis.call('SREM', P .. 'open', slot)
    redis.call('SREM', P .. 't:' .. tok, slot)
    redis.call('RPUSH', P .. 'free', slot)
    wake(P, slot, 0)
    journal(P, 'release', 's', slot, 'o', op, 'st', 0)
    return committed(st, 0, gen)
end))

-- {0, the wait stream's last id (before blocking on it), state, generation}
-- or {code}; arms the slot's waiting flag for ttl ms (never shortening
-- another waiter's).  State and last id are read in the same step as the
-- flag is armed: a commit after it reaches the stream (wait_for: check, then
-- block past that id, with no window between)
REG('wprep', once(function(keys, args)
    local P = tag(keys)
    local p = P .. 'p:' .. args[1]
    local st, err = live(p, tonumber(args[2]))
    if not st then return {err} end
    local wf, ttl = P .. 'wf:' .. args[1], tonumber(args[3])
    if redis.call('PTTL', wf) < ttl then redis.call('SET', wf, 1, 'PX', ttl) end
    local last = redis.call('XREVRANGE', P .. 'w:' .. args[1], '+', '-', 'COUNT', 1)
    local gen = tonumber(redis.call('HGET', p, 'gen')) or 0
    if #last == 0 then return {0, '0-0', st, gen} end
    return {0, last[1][1], st, gen}
end))

-- The shard's journal after seq args[1], at most args[2] entries:
-- {last seq, oldest retained seq (0: none retained), entry...}, read in one
-- step (a trim cannot fall between the bounds and the entries)
REG('jread', function(keys, args)
    local P = tag(keys)
    local last = tonumber(redis.call('HGET', P .. 'm', 'jseq')) or 0
    local head = redis.call('XRANGE', P .. 'j', '-', '+', 'COUNT', 1)
    local oldest = 0
    if #head > 0 then oldest = tonumber(string.match(head[1][1], '^(%d+)')) end
    local after, n = tonumber(args[1]), tonumber(args[2])
    local out = {last, oldest}
    if after < last and n > 0 then
        local from = string.format('%d', math.max(after, oldest - 1) + 1) .. '-0'
        for _, e in ipairs(redis.call('XRANGE', P .. 'j', from, '+', 'COUNT', n)) do
            out[#out + 1] = e
        end
    end
    return out
end, NO_WRITES)

-- one page of the shard's open positions: one SSCAN step from cursor args[1]
-- of about args[2] slots, so a call holds the server a bounded time however
-- many are open.  {next cursor ('0': the last page), row, row, ...}, a row
-- (slot, op, st, gen, locked, ctr, pr, pv, cv, rec) read in one step.  SSCAN
-- returns every slot open for the whole scan, perhaps twice (the client keeps one)
REG('snap', function(keys, args)
    local P = tag(keys)
    local page = redis.call('SSCAN', P .. 'open', args[1], 'COUNT', args[2])
    local out = {page[1]}
    for _, slot in ipairs(page[2]) do
        local p = P .. 'p:' .. slot
        local v = redis.call('HMGET', p, 'op', 'st', 'gen', 'ctr', 'pr', 'pv', 'cv', 'rec')
        out[#out + 1] = struct.pack('<I4I4I4I4', tonumber(slot), tonumber(v[1]), tonumber(v[2]),
                                    redis.call('EXISTS', P .. 'g:' .. slot)) ..
                        struct.pack('<ddd', tonumber(v[3]) or 0, tonumber(v[4]) or 0,
                                    tonumber(v[6]) or 0) ..
                        struct.pack('<d', tonumber(v[7]) or 0) .. v[5] .. v[8]
    end
    return out
end, NO_WRITES)

REG('halt', function(keys, args)
    local was = redis.call('HGET', keys[1], 'halted') == '1'
    redis.call('HSET', keys[1], 'halted', args[1])
    if was ~= (args[1] == '1') then journal(tag(keys), 'halt', 'r', args[1]) end
    return 0
end, ALLOW_OOM)

REG('setmetrics', function(keys, args)
    redis.call('HSET', keys[1], 'metrics', args[1])
    return 0
end)

-- accounts -------------------------------------------------------------------------
-- args: cash, max_exposure, max_positions, max_loss, the key ('' for none:
-- akeys maps each open account's key to 'n:op'), the free account number the
-- client declared ('' for none) and its pick (see pick_free)
-- returns {0, n, op, next} or {code}
REG('aopen', once(function(keys, args)
    local P = tag(keys)
    local pick = tonumber(args[7])
    local n, cand = pick_free(P .. 'afree', args[6], pick)
    if n == nil then return need(cand, {P .. 'a:' .. cand}) end
    local akey = args[5]
    if akey ~= '' and redis.call('HEXISTS', P .. 'akeys', akey) == 1 then
        return {outcome(P, 'account', EKEYEXISTS)}
    end
    if not n then return {outcome(P, 'account', EACCTFULL)} end   -- an error, as C counts it
    count(P, 'account', 'applied')
    redis.call('LREM', P .. 'afree', 1, n)
    local a = P .. 'a:' .. n
    local op = redis.call('HINCRBY', a, 'op', 1)
    redis.call('HSET', a, 'open', '1', 'cash', args[1], 'reserved', '0', 'realized', '0',
               'opening_cash', args[1], 'deposits', '0', 'withdrawals', '0',
               'max_exposure', args[2], 'max_positions', args[3], 'max_loss', args[4],
               'open_positions', '0', 'halted', '0', 'worst_gain', '0', 'worst_loss', '0')
    redis.call('HINCRBY', a, 'version', 1)
    if akey ~= '' then
        redis.call('HSET', P .. 'akeys', akey, n .. ':' .. op)
        redis.call('HSET', a, 'key', akey)
    else
        redis.call('HDEL', a, 'key')
    end
    journal_account(P, n, a)
    return {0, tonumber(n), op, next_free(P .. 'afree', pick)}
end))

REG('aread', function(keys, args)
    local a, err = account_of(tag(keys), args[1], tonumber(args[2]))
    if not a then return {err} end
    return {0, books(a), redis.call('HGET', a, 'key')}
end, NO_WRITES)

-- cash moves: args n, op, kind ('deposit' / 'withdraw'), amount (decimal)
REG('acash', once(function(keys, args)
    local P = tag(keys)
    local a, err = account_of(P, args[1], tonumber(args[2]))
    if not a then return {outcome(P, 'account', err)} end
    local amount = args[4]
    if args[3] == 'withdraw' then
        local b = books(a)
        local moved = add(a, 'cash', neg(amount))   -- fails only past int64: more than cash
        if not moved or cmp(redis.call('HGET', a, 'cash'), b[2]) < 0 then
            if moved then redis.call('HINCRBY', a, 'cash', amount) end
            return {outcome(P, 'account', ERISK_CASH), amount, unpack(b)}
        end
        if not add(a, 'withdrawals', amount) then   -- as C: nothing moves
            redis.call('HINCRBY', a, 'cash', amount)
            return {outcome(P, 'account', EBADMONEY)}
        end
    else
        local b = books(a)
        -- cash + amount, with room for the open positions' worst gains (as C)
        if not add(a, 'cash', amount) then
            return {outcome(P, 'account', EBADMONEY), amount, unpack(b)}
        end
        if not fits(a, redis.call('HGET', a, 'cash'), b[14] or '0') or
                not add(a, 'deposits', amount) then
            redis.call('HINCRBY', a, 'cash', neg(amount))
            return {outcome(P, 'account', EBADMONEY), amount, unpack(b)}
        end
    end
    redis.call('HINCRBY', a, 'version', 1)
    journal_account(P, args[1], a)
    return {outcome(P, 'account', 0)}
end))

-- limits and halt: args n, op, version seen ('' for any), attempt, then
-- field, value pairs
REG('aset', once(function(keys, args)
    local P = tag(keys)
    local a, err = account_of(P, args[1], tonumber(args[2]))
    if not a then return outcome(P, 'account', err) end
    if args[4] ~= '0' then count(P, 'account', 'retries') end
    if args[3] ~= '' and redis.call('HGET', a, 'version') ~= args[3] then
        return outcome(P, 'account', EVERSION)
    end
    for i = 5, #args, 2 do redis.call('HSET', a, args[i], args[i + 1]) end
    if args[3] ~= '' then   -- losses already at a lowered max_loss halt it, as a closing would
        local realized = redis.call('HGET', a, 'realized')
        if string.sub(realized, 1, 1) == '-' and
                cmp(neg(realized), redis.call('HGET', a, 'max_loss')) >= 0 then
            redis.call('HSET', a, 'halted', '1')
        end
    end
    redis.call('HINCRBY', a, 'version', 1)
    journal_account(P, args[1], a)
    return outcome(P, 'account', 0)
end))

REG('aclose', once(function(keys, args)
    local P = tag(keys)
    local a, err = account_of(P, args[1], tonumber(args[2]))
    if not a then return err end
    if redis.call('HGET', a, 'open_positions') ~= '0' then return EACCTBUSY end
    -- the books it closes with, in the reply: a close made again after a lost
    -- reply gets them from its request record (the account reads stale by then)
    local last = books(a)
    redis.call('HSET', a, 'open', '0')
    redis.call('HINCRBY', a, 'version', 1)   -- a change of the account, as on shared memory
    journal_account(P, args[1], a)   -- with its key, as on shared memory: before it goes
    local k = redis.call('HGET', a, 'key')
    if k then   -- its key names nothing from now on
        redis.call('HDEL', P .. 'akeys', k)
        redis.call('HDEL', a, 'key')
    end
    redis.call('RPUSH', P .. 'afree', args[1])
    return {0, last}
end))

-- the open account with key args[1]: {0, n, op}, or {0}
REG('alookup', function(keys, args)
    local v = redis.call('HGET', tag(keys) .. 'akeys', args[1])
    if not v then return {0} end
    local n, op = string.match(v, '^(%d+):(%d+)$')
    return {0, tonumber(n), tonumber(op)}
end, NO_WRITES)

REG('alist', function(keys, args)
    local P = tag(keys)
    local out = {}
    for n = tonumber(args[1]), tonumber(args[2]) - 1, tonumber(args[3]) do
        local a = P .. 'a:' .. n
        if redis.call('HGET', a, 'open') == '1' then
            out[#out + 1] = {n, books(a), redis.call('HGET', a, 'key')}
        end
    end
    return out
end, NO_WRITES)

-- the shard's free position slots and free account records: {free, afree}
-- (the numbers of a keyed or booked open refused on a full shard)
REG('nfree', function(keys, args)
    local P = tag(keys)
    return {redis.call('LLEN', P .. 'free'), redis.call('LLEN', P .. 'afree')}
end, NO_WRITES)

-- a no-op: the incarnation check alone (metrics() reads the counters directly)
REG('alive', function(keys, args) return 0 end, NO_WRITES)

-- create and remove ---------------------------------------------------------------
-- A name is claimed in one call (claim: shard 0's meta, not ready, with a
-- lease key that the creator renews); the other shards' metas are written
-- (binit), the free lists filled in bounded chunks (fill) and each shard
-- sealed ready, shard 0 last (seal).  Each step checks that the shard is
-- still the caller's (its inc), so a creator that lost its claim (it stalled
-- past its lease and another took over) builds nothing that counts.  A
-- not-ready name whose lease expired is taken over by the next claim, which
-- reports that its remains must be cleared first.  drop claims a name for
-- removal the same way (its own number, a lease) so that a removal killed
-- half-way leaves a not-ready name that the next create clears.
--
-- Every claim has a generation 'gen' (the server's clock in us at the claim,
-- above the generation it took over), stored in each shard's meta it
-- builds.  Remains are deleted only by wipe, on their own shard, in the same
-- step as it checks that the shard holds nothing of a newer claim: a stalled
-- creator or remover that lost its claim can never delete a newer engine's
-- keys.

-- a generation above `old` (a claim's): the server's clock in us, or old + 1
local function newgen(old)
    local t = redis.call('TIME')
    return string.format('%d', math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]),
                                         (tonumber(old) or 0) + 1))
end

-- may the claim (inc, gen) delete remains on the shard of meta m?  Yes when
-- the shard has no meta, its meta is the claim's own, or an older claim's
local function older(m, inc, gen)
    local v = redis.call('HMGET', m, 'inc', 'gen')
    return not v[1] or v[1] == inc or (tonumber(v[2]) or 0) < tonumber(gen)
end

-- the first of m / free / afree of shard P that is not this engine's kind, or nil
local function foreign(P, magic)
    local m = P .. 'm'
    local t = redis.call('TYPE', m)['ok']
    if t ~= 'none' and (t ~= 'hash' or redis.call('HGET', m, 'magic') ~= magic) then return m end
    for _, k in ipairs({'free', 'afree'}) do
        t = redis.call('TYPE', P .. k)['ok']
        if t ~= 'none' and t ~= 'list' then return P .. k end
    end
    return nil
end

-- keys a shard holds without a meta of ours: remains the client must clear
local function remains(P)
    return redis.call('EXISTS', P .. 'free', P .. 'afree', P .. 'open', P .. 's') > 0
end

-- args: lease ms, magic, meta field/value pairs.  {C_OK, gen, shards of the
-- engine taken over (0: none), remains (1: clear the name first)}, {C_EXISTS},
-- {C_BUSY, lease ms left}, {C_FOREIGN, key}
REG('claim', function(keys, args, inc)
    local P = tag(keys)
    local m, lease = keys[1], P .. 'lease'
    local bad = foreign(P, args[2])
    if bad then return {C_FOREIGN, bad} end
    local gen, old, left = newgen(0), 0, 0
    if redis.call('EXISTS', m) == 1 then
        local v = redis.call('HMGET', m, 'ready', 'gen', 'shards', 'inc')
        if v[4] == inc and v[1] ~= '1' then return {C_OK, v[2], 0, 0} end   -- a resend
        if v[1] == '1' then return {C_EXISTS} end
        if redis.call('EXISTS', lease) == 1 then return {C_BUSY, redis.call('PTTL', lease)} end
        gen, old, left = newgen(v[2]), tonumber(v[3]) or 0, 1
        redis.call('DEL', m)
    end
    if remains(P) then left = 1 end
    redis.call('UNLINK', P .. 'free', P .. 'afree')
    redis.call('HSET', m, unpack(args, 3))
    redis.call('HSET', m, 'inc', inc, 'gen', gen, 'ready', '0')
    redis.call('SET', lease, inc, 'PX', args[1])
    return {C_OK, gen, old, left}
end)

-- a shard's meta (shard > 0).  args: gen of the claim, magic, meta pairs.
-- {C_OK}, {C_REMAINS} (clear the shard, then again), {C_LOST}, {C_FOREIGN, key}
REG('binit', function(keys, args, inc)
    local P = tag(keys)
    local m = keys[1]
    local bad = foreign(P, args[2])
    if bad then return {C_FOREIGN, bad} end
    if redis.call('EXISTS', m) == 1 then
        local v = redis.call('HMGET', m, 'inc', 'ready', 'gen')
        if v[1] == inc then return {C_OK} end   -- a resend
        -- a newer claim's shard: this creator lost its claim
        if (tonumber(v[3]) or 0) >= tonumber(args[1]) then return {C_LOST} end
        return {C_REMAINS}
    end
    if remains(P) then return {C_REMAINS} end
    redis.call('HSET', m, unpack(args, 3))
    redis.call('HSET', m, 'inc', inc, 'gen', args[1], 'ready', '0')
    return {C_OK}
end)

-- push first + step * i for i in [from, from + n) onto list args[1]
-- (free / afree); C_OK, or C_LOST (not the caller's, or not what it built)
REG('fill', function(keys, args, inc)
    local P = tag(keys)
    local v = redis.call('HMGET', keys[1], 'inc', 'ready')
    if v[1] ~= inc or v[2] == '1' then return C_LOST end
    local list = P .. args[1]
    local first, step, from, n = tonumber(args[2]), tonumber(args[3]), tonumber(args[4]),
                                 tonumber(args[5])
    local have = redis.call('LLEN', list)
    if have == from + n then return C_OK end   -- a resend of a chunk that applied
    if have ~= from then return C_LOST end
    local batch = {}
    for i = from, from + n - 1 do
        batch[#batch + 1] = string.format('%d', first + step * i)
        if #batch == 1000 then
            redis.call('RPUSH', list, unpack(batch))
            batch = {}
        end
    end
    if #batch > 0 then redis.call('RPUSH', list, unpack(batch)) end
    return C_OK
end)

-- ready, once the lists hold args[1] slots and args[2] accounts; shard 0 drops the lease
REG('seal', function(keys, args, inc)
    local P = tag(keys)
    local v = redis.call('HMGET', keys[1], 'inc', 'ready')
    if v[1] ~= inc then return C_LOST end
    if v[2] ~= '1' then
        if redis.call('LLEN', P .. 'free') ~= tonumber(args[1]) or
                redis.call('LLEN', P .. 'afree') ~= tonumber(args[2]) then
            return C_LOST
        end
        redis.call('HSET', keys[1], 'ready', '1')
    end
    if redis.call('GET', P .. 'lease') == inc then redis.call('DEL', P .. 'lease') end
    return C_OK
end)

-- the claim's lease for args[1] ms more, while the claim is the caller's
REG('renew', function(keys, args, inc)
    local v = redis.call('HMGET', keys[1], 'inc', 'ready')
    if v[1] ~= inc or v[2] == '1' then return C_LOST end
    redis.call('SET', tag(keys) .. 'lease', inc, 'PX', args[1])
    return C_OK
end)

-- delete keys args[2..] of this shard, remains of older claims than the
-- caller's (generation args[1]); never the caller's own meta or lease
REG('wipe', function(keys, args, inc)
    if not older(keys[1], inc, args[1]) then return C_LOST end
    local own = redis.call('HGET', keys[1], 'inc') == inc
    local lease = tag(keys) .. 'lease'
    for i = 2, #args do
        if not (own and (args[i] == keys[1] or args[i] == lease)) then
            redis.call('UNLINK', args[i])
        end
    end
    return C_OK
end)

-- delete the shard's meta, lists and lease if they are the caller's
REG('abort', function(keys, args, inc)
    local P = tag(keys)
    if redis.call('TYPE', keys[1])['ok'] ~= 'hash' or
            redis.call('HGET', keys[1], 'inc') ~= inc then
        return C_LOST
    end
    redis.call('DEL', keys[1])
    redis.call('UNLINK', P .. 'free', P .. 'afree')
    if redis.call('GET', P .. 'lease') == inc then redis.call('DEL', P .. 'lease') end
    return C_OK
end)

-- claim shard 0 for removal: args the incarnation expected ('' for any),
-- lease ms, magic, force ('1': even while a creator holds its lease).  The
-- meta stays, not ready, under the caller's number and lease, until the
-- remover has deleted everything else (then abort).  {C_OK, shards, gen},
-- {C_GONE}, {C_BUSY, ms left}, {C_FOREIGN, key}
REG('drop', function(keys, args, inc)
    local P = tag(keys)
    local m, lease = keys[1], P .. 'lease'
    local bad = foreign(P, args[3])
    if bad then return {C_FOREIGN, bad} end
    if redis.call('EXISTS', m) == 0 then return {C_GONE} end
    local v = redis.call('HMGET', m, 'inc', 'ready', 'shards', 'gen')
    if v[1] == inc then return {C_OK, tonumber(v[3]) or 1, v[4]} end   -- a resend
    if args[1] ~= '' and v[1] ~= args[1] then return {C_GONE} end
    if v[2] ~= '1' and args[4] ~= '1' and redis.call('EXISTS', lease) == 1 then
        return {C_BUSY, redis.call('PTTL', lease)}
    end
    local gen = newgen(redis.call('HGET', m, 'gen'))
    redis.call('HSET', m, 'inc', inc, 'gen', gen, 'ready', '0', 'dropping', '1')
    redis.call('SET', lease, inc, 'PX', args[2])
    return {C_OK, tonumber(v[3]) or 1, gen}
end)
