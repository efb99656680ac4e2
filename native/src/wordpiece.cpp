#include "wordpiece.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>

namespace rag {

namespace {

bool is_alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

}  // namespace

WordPiece::WordPiece(const std::vector<std::string>& vocab, std::int64_t unk_id, std::int64_t cls_id,
                     std::int64_t sep_id, std::size_t max_chars, std::size_t max_tokens, std::vector<std::string> added)
    : unk_(unk_id), cls_(cls_id), sep_(sep_id), max_chars_(max_chars), max_tokens_(max_tokens),
      added_(std::move(added)) {
    const auto n = static_cast<std::int64_t>(vocab.size());
    if (n > std::numeric_limits<std::int32_t>::max()) throw std::invalid_argument("vocab is too large");
    for (const std::int64_t id : {unk_id, cls_id, sep_id}) {
        if (id < 0 || id >= n) {
            throw std::invalid_argument("special token id " + std::to_string(id) + " is not in a vocabulary of " +
                                        std::to_string(n));
        }
    }
    std::size_t capacity = 16;
    while (capacity < 2 * vocab.size()) capacity *= 2;  // at most half full: short probes
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    for (std::int64_t i = 0; i < n; ++i) {
        const std::string& piece = vocab[static_cast<std::size_t>(i)];
        const bool inner = piece.size() > 2 && piece[0] == '#' && piece[1] == '#';
        insert(inner, inner ? std::string_view(piece).substr(2) : std::string_view(piece), static_cast<std::int32_t>(i));
    }
}

std::uint64_t WordPiece::hash(bool inner, std::string_view piece) {
    std::uint64_t h = inner ? 0x9e3779b97f4a7c15ULL : 0xcbf29ce484222325ULL;  // FNV-1a, one basis per kind
    for (const char c : piece) {
        h ^= static_cast<unsigned char>(c);
        h *= 0x100000001b3ULL;
    }
    return h ^ (h >> 29);
}

void WordPiece::insert(bool inner, std::string_view piece, std::int32_t id) {
    longest_ = std::max(longest_, piece.size());
    ++size_;
    if (piece.size() >= kKey) {
        long_.emplace(std::string(inner ? "##" : "").append(piece), id);
        return;
    }
    const char kind = inner ? '#' : '\0';
    for (std::uint64_t at = hash(inner, piece) & mask_;; at = (at + 1) & mask_) {
        Slot& slot = slots_[at];
        if (slot.length == 0) {
            slot.key[0] = kind;
            std::memcpy(slot.key + 1, piece.data(), piece.size());
            slot.length = static_cast<std::uint8_t>(piece.size() + 1);
            slot.id = id;
            return;
        }
    }
}

std::int64_t WordPiece::find(bool inner, std::string_view piece) const {
    if (piece.size() >= kKey) {
        const auto hit = long_.find(std::string(inner ? "##" : "").append(piece));
        return hit == long_.end() ? -1 : hit->second;
    }
    const char kind = inner ? '#' : '\0';
    for (std::uint64_t at = hash(inner, piece) & mask_;; at = (at + 1) & mask_) {
        const Slot& slot = slots_[at];
        if (slot.length == 0) return -1;
        if (slot.length == piece.size() + 1 && slot.key[0] == kind &&
            std::memcmp(slot.key + 1, piece.data(), piece.size()) == 0) {
            return slot.id;
        }
    }
}

void WordPiece::word(std::string_view w, std::vector<std::int64_t>& out) const {
    if (w.size() > max_chars_) {
        out.push_back(unk_);
        return;
    }
    const std::size_t first = out.size();
    std::size_t start = 0;
    while (start < w.size()) {
        std::int64_t found = -1;
        std::size_t end = std::min(w.size(), start + longest_);
        for (; end > start; --end) {
            found = find(start > 0, w.substr(start, end - start));
            if (found >= 0) break;
        }
        if (found < 0) {  // a part no piece matches: the whole word is unknown
            out.resize(first);
            out.push_back(unk_);
            return;
        }
        out.push_back(found);
        start = end;
    }
}

bool WordPiece::encode(std::string_view text, std::vector<std::int64_t>& out) const {
    std::string lower(text.size(), ' ');
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        if (c == '\t' || c == '\n' || c == '\r') continue;  // whitespace: stays ' '
        if (c < 0x20 || c > 0x7e) return false;             // a control or non-ASCII character
        lower[i] = (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
    }
    for (const auto& token : added_) {
        if (!token.empty() && lower.find(token) != std::string::npos) return false;
    }
    out.clear();
    out.push_back(cls_);
    std::size_t i = 0;
    while (i < lower.size()) {
        const char c = lower[i];
        if (c == ' ') {
            ++i;
            continue;
        }
        if (!is_alnum(c)) {  // punctuation: a word of its own
            word(std::string_view(&lower[i], 1), out);
            ++i;
            continue;
        }
        std::size_t j = i;
        while (j < lower.size() && is_alnum(lower[j])) ++j;
        word(std::string_view(&lower[i], j - i), out);
        i = j;
    }
    if (out.size() - 1 > max_tokens_) out.resize(max_tokens_ + 1);
    out.push_back(sep_);
    return true;
}

}  // namespace rag
